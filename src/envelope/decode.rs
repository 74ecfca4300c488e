//! Debezium JSON to a [`Decoded`]: the envelope (schemaless, or `{schema, payload}`), its
//! `source` block and position, and why a record is not a change ([`DecodeError`]).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::schema::InferredSchemas;
use super::{
    json, ChangeEvent, Decoded, Op, Reject, RowSchema, SkipReason, SourceInfo, SourceText,
    ValueForm,
};
use crate::domain::{KafkaCoordinates, Position, TableId};

/// Why a record is rejected at decode. `Display` is the reason stored with it; [`kind`]
/// (`DecodeError::kind`) is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("value is not UTF-8: {0}")]
    NotUtf8(std::str::Utf8Error),
    #[error("{}", json::too_deep_reason(.what, *.depth))]
    TooDeep { what: &'static str, depth: usize },
    #[error("value is not valid JSON: {0}")]
    InvalidJson(serde_json::Error),
    #[error("record key is not valid JSON: {0}")]
    InvalidKey(serde_json::Error),
    /// JSON, but not a Debezium envelope.
    #[error("{0}")]
    NotAnEnvelope(String),
    #[error("unknown op {0:?}")]
    UnknownOp(String),
    /// The `{schema, payload}` form's Connect schema cannot be read.
    #[error("{0}")]
    BadSchema(String),
    /// An envelope with a missing or mistyped field.
    #[error("{0}")]
    Malformed(String),
}

impl DecodeError {
    /// A short stable class for the rejects metric.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::NotUtf8(_) => "invalid_utf8",
            DecodeError::TooDeep { .. } => "too_deep",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::InvalidKey(_) => "invalid_key",
            DecodeError::NotAnEnvelope(_) => "not_an_envelope",
            DecodeError::UnknownOp(_) => "unknown_op",
            DecodeError::BadSchema(_) => "bad_schema",
            DecodeError::Malformed(_) => "malformed_envelope",
        }
    }
}

fn malformed(reason: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(reason.into())
}

#[derive(Deserialize)]
struct WireSource {
    connector: Option<String>,
    name: Option<String>,
    db: Option<String>,
    schema: Option<String>,
    table: Option<String>,
    ts_ms: Option<i64>,
    snapshot: Option<String>,
    #[serde(rename = "txId")]
    tx_id: Option<i64>,
    lsn: Option<i64>,
    sequence: Option<String>,
}

/// Decodes Debezium JSON records (schemaless, or `{schema, payload}`).
///
/// Keeps a cache of parsed Connect schemas so that the defaults form, which repeats the full
/// schema in every record, costs one parse per distinct schema; and the schemas it inferred
/// last, so that schemaless changes of one shape share one schema.
#[derive(Default)]
pub struct Decoder {
    schemas: HashMap<u64, Arc<RowSchema>>,
    inferred: InferredSchemas,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn decode(
        &mut self,
        coords: KafkaCoordinates,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Decoded {
        let value = match value {
            None | Some([]) => return Decoded::Skip(coords, SkipReason::Tombstone),
            Some(v) => v,
        };
        match self.decode_value(&coords, key, value) {
            Ok(d) => d,
            Err(error) => Decoded::Reject(Reject {
                kind: error.kind(),
                coords,
                key: key.map(<[u8]>::to_vec),
                value: Some(value.to_vec()),
                reason: error.to_string(),
            }),
        }
    }

    fn decode_value(
        &mut self,
        coords: &KafkaCoordinates,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Decoded, DecodeError> {
        let text = std::str::from_utf8(value).map_err(DecodeError::NotUtf8)?;
        if let Some(depth) = json::exceeds_depth(value, json::MAX_DEPTH) {
            return Err(DecodeError::TooDeep {
                what: "the value",
                depth,
            });
        }
        if let Some(depth) = key.and_then(|k| json::exceeds_depth(k, json::MAX_DEPTH)) {
            return Err(DecodeError::TooDeep {
                what: "the record key",
                depth,
            });
        }
        let outer = parse_wire(text)?;
        // {schema, payload} form: the row types come from the schema.
        let (wire, connect_schema) = match outer.payload {
            Some(p) if outer.op.is_none() && outer.source.is_none() => {
                if !p.get().trim_start().starts_with('{') {
                    return Err(DecodeError::NotAnEnvelope(
                        "envelope payload is not a JSON object".into(),
                    ));
                }
                (parse_wire(p.get())?, outer.schema)
            }
            _ => (outer, None),
        };
        if wire.op.is_none() {
            return classify_non_change(coords, text);
        }
        let types = match connect_schema {
            Some(s) => RowTypes::Connect(s),
            None => RowTypes::Inferred,
        };
        self.change(coords, wire, types, key.map(ReceivedKey::Json), text)
    }

    /// The change an envelope with an `op` describes, after the checks every envelope gets:
    /// the JSON and the Avro path both end here, so they build identical events. `value_text`
    /// becomes the change's `raw_value`; the blocks of `wire` that are slices of it are kept as
    /// ranges of it.
    pub(super) fn change(
        &mut self,
        coords: &KafkaCoordinates,
        wire: WireEnvelope<'_>,
        types: RowTypes<'_>,
        key: Option<ReceivedKey<'_>>,
        value_text: &str,
    ) -> Result<Decoded, DecodeError> {
        let op_code = wire
            .op
            .as_ref()
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("envelope field op is not a string"))?;
        let op = Op::parse(op_code).ok_or_else(|| DecodeError::UnknownOp(op_code.into()))?;

        let source_raw = wire
            .source
            .ok_or_else(|| malformed("envelope has no source block"))?;
        let (source, mut table) = parse_source(source_raw).map_err(DecodeError::Malformed)?;
        if op == Op::Message && table.schema.is_empty() && table.table.is_empty() {
            // Logical messages belong to no table; one name keeps them together in the raw
            // log and under one lake directory instead of `table=.`.
            table = TableId::new("pg_logical", "message");
        }

        let before = into_row(wire.before, "before")?;
        // A logical message has no row; its {prefix, content} takes the after image's place,
        // so the raw log and the lake's typed columns keep it.
        let after = match op {
            Op::Message => into_row(wire.message, "message")?,
            _ => into_row(wire.after, "after")?,
        };
        match op {
            Op::Create | Op::Read | Op::Update if after.is_none() => {
                return Err(malformed(format!("op {op_code:?} without an after image")))
            }
            Op::Delete if before.is_none() && key.is_none() => {
                return Err(malformed("delete without a before image or a key"))
            }
            _ => {}
        }

        let inferred = |d: &mut Self| d.inferred.share_change(before.as_ref(), after.as_ref());
        let row_schema = match types {
            // A message's Connect schema has no row struct; its block is typed by inference.
            _ if op == Op::Message => inferred(self),
            RowTypes::Connect(s) => self.connect_schema(s)?,
            RowTypes::Compiled(Some(s)) => s,
            RowTypes::Compiled(None) => return Err(no_row_struct()),
            RowTypes::Inferred => inferred(self),
        };

        let (raw_key, key_payload) = match key {
            None => (None, None),
            Some(ReceivedKey::Json(k)) => {
                let text = String::from_utf8_lossy(k);
                let parsed = json::from_str::<Value>(&text).map_err(DecodeError::InvalidKey)?;
                (
                    Some(Arc::<str>::from(text.as_ref())),
                    key_payload_of(parsed),
                )
            }
            Some(ReceivedKey::Decoded { text, value }) => (Some(text), key_payload_of(value)),
        };

        Ok(Decoded::Change(Arc::new(ChangeEvent {
            coords: coords.clone(),
            key: key_payload,
            op,
            table,
            before,
            after,
            values: ValueForm::Debezium,
            position: source.position(coords.offset),
            source,
            source_json: SourceText::locate(source_raw, value_text),
            transaction: wire.transaction.map(ToOwned::to_owned),
            ts_ms: wire.ts_ms.as_ref().and_then(Value::as_i64),
            schema: row_schema,
            raw_value: Arc::from(value_text),
            raw_key,
            avro: None,
        })))
    }

    fn connect_schema(&mut self, schema: &RawValue) -> Result<Arc<RowSchema>, DecodeError> {
        use std::hash::{Hash, Hasher};
        // Keyed by the schema's text as received: one parse per distinct schema.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        schema.get().hash(&mut h);
        let id = h.finish();
        if let Some(s) = self.schemas.get(&id) {
            return Ok(s.clone());
        }
        let value: Value = serde_json::from_str(schema.get()).map_err(|e| {
            DecodeError::BadSchema(format!("Connect schema is not valid JSON: {e}"))
        })?;
        let parsed = RowSchema::from_connect_envelope(&value).ok_or_else(no_row_struct)?;
        let parsed = Arc::new(parsed);
        self.schemas.insert(id, parsed.clone());
        Ok(parsed)
    }
}

/// The typed parts and the table of a Debezium `source` block.
pub fn parse_source(raw: &RawValue) -> Result<(SourceInfo, TableId), String> {
    let source: WireSource = serde_json::from_str(raw.get())
        .map_err(|e| format!("envelope source block is malformed: {e}"))?;
    let (Some(schema_name), Some(table_name)) = (source.schema, source.table) else {
        return Err("envelope source block names no schema/table".into());
    };
    Ok((
        SourceInfo {
            connector: source.connector,
            name: source.name,
            db: source.db,
            ts_ms: source.ts_ms,
            snapshot: source.snapshot,
            tx_id: source.tx_id,
            lsn: source.lsn,
            sequence: source.sequence,
        },
        TableId::new(schema_name, table_name),
    ))
}

impl SourceInfo {
    /// The ordering position of a change at `offset` (see [`Position`]).
    pub fn position(&self, offset: i64) -> Position {
        let (seq_commit, seq_change) = self
            .sequence
            .as_deref()
            .map_or((None, None), parse_sequence);
        let change_lsn = seq_change.or(self.lsn).unwrap_or(0);
        Position {
            commit_lsn: seq_commit.unwrap_or(change_lsn),
            change_lsn,
            offset,
        }
    }
}

fn no_row_struct() -> DecodeError {
    DecodeError::BadSchema("Connect schema has no before/after struct".into())
}

/// A record key's payload: the key struct without a `{schema, payload}` wrapper, or None for a
/// null key.
fn key_payload_of(key: Value) -> Option<Value> {
    match key {
        Value::Object(mut m) if m.contains_key("payload") && m.contains_key("schema") => {
            m.remove("payload")
        }
        v => Some(v),
    }
    .filter(|v| !v.is_null())
}

/// How the column types of a change are known.
pub(super) enum RowTypes<'a> {
    /// The `{schema, payload}` form's Connect schema, as received.
    Connect(&'a RawValue),
    /// Compiled once per writer schema (the Avro path); None when it has no row struct.
    Compiled(Option<Arc<RowSchema>>),
    /// Schemaless: inferred from the values.
    Inferred,
}

/// A record key as the decoder receives it.
pub(super) enum ReceivedKey<'a> {
    /// JSON text as received (either form).
    Json(&'a [u8]),
    /// Already decoded (the Avro path): its JSON rendering and value.
    Decoded { text: Arc<str>, value: Value },
}

/// The fields of an envelope (either form), borrowing what is stored verbatim.
#[derive(Deserialize, Default)]
pub(super) struct WireEnvelope<'a> {
    #[serde(borrow, default)]
    pub(super) schema: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub(super) payload: Option<&'a RawValue>,
    #[serde(default)]
    pub(super) before: Option<Value>,
    #[serde(default)]
    pub(super) after: Option<Value>,
    #[serde(borrow, default)]
    pub(super) source: Option<&'a RawValue>,
    #[serde(default)]
    pub(super) op: Option<Value>,
    #[serde(default)]
    pub(super) ts_ms: Option<Value>,
    #[serde(borrow, default)]
    pub(super) transaction: Option<&'a RawValue>,
    /// Logical decoding messages (op `m`): `{prefix, content}`.
    #[serde(default)]
    pub(super) message: Option<Value>,
}

fn parse_wire(text: &str) -> Result<WireEnvelope<'_>, DecodeError> {
    json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => DecodeError::NotAnEnvelope(format!(
            "value is not a JSON object, so not a Debezium envelope: {e}"
        )),
        _ => DecodeError::InvalidJson(e),
    })
}

/// Envelopes without `op`: Debezium heartbeats and transaction markers are skips; anything else
/// is not an envelope. (A rare path: the value is parsed again, whole.)
fn classify_non_change(coords: &KafkaCoordinates, text: &str) -> Result<Decoded, DecodeError> {
    let payload: Map<String, Value> = match json::from_str::<Map<String, Value>>(text) {
        Ok(mut m) => match m.remove("payload") {
            Some(Value::Object(p)) => p,
            Some(other) => {
                m.insert("payload".into(), other);
                m
            }
            None => m,
        },
        Err(e) => {
            return Err(DecodeError::NotAnEnvelope(format!(
                "value is not a JSON object: {e}"
            )))
        }
    };
    if payload.contains_key("status") && payload.contains_key("id") {
        return Ok(Decoded::Skip(coords.clone(), SkipReason::TransactionMarker));
    }
    if payload.len() == 1 && payload.get("ts_ms").is_some_and(Value::is_i64) {
        return Ok(Decoded::Skip(coords.clone(), SkipReason::Heartbeat));
    }
    Err(DecodeError::NotAnEnvelope(
        "JSON object is not a Debezium envelope (no op field)".into(),
    ))
}

fn into_row(v: Option<Value>, field: &str) -> Result<Option<Map<String, Value>>, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(malformed(format!(
            "envelope field {field} is not an object"
        ))),
    }
}

/// Parses `source.sequence`: a JSON string holding `[last_commit_lsn, change_lsn]` as decimal
/// strings or nulls.
fn parse_sequence(seq: &str) -> (Option<i64>, Option<i64>) {
    let Ok(Value::Array(parts)) = serde_json::from_str::<Value>(seq) else {
        return (None, None);
    };
    let lsn = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.parse().ok(),
        Some(Value::Number(n)) => n.as_i64(),
        _ => None,
    };
    (lsn(parts.first()), lsn(parts.get(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coords(offset: i64) -> KafkaCoordinates {
        KafkaCoordinates {
            topic: "t".into(),
            partition: 0,
            offset,
            timestamp_ms: Some(1),
        }
    }

    fn decode(key: Option<&str>, value: Option<&str>) -> Decoded {
        Decoder::new().decode(coords(0), key.map(str::as_bytes), value.map(str::as_bytes))
    }

    fn reason(d: Decoded) -> String {
        match d {
            Decoded::Reject(r) => r.reason,
            other => panic!("expected a reject, got {other:?}"),
        }
    }

    /// The source block is kept as a range of the value, in both envelope forms, and reads back
    /// byte for byte as sent (spacing included: the raw log stores it verbatim).
    #[test]
    fn the_source_block_is_a_range_of_the_value_as_sent() {
        let source = r#"{ "schema": "public","table":"t",  "lsn": 7 }"#;
        let plain = format!(r#"{{"op":"c","after":{{"id":1}},"source":{source}}}"#);
        let schema = r#"{"type":"struct","fields":[{"field":"after","type":"struct",
            "fields":[{"field":"id","type":"int32"}]}]}"#;
        let wrapped = format!(r#"{{"schema":{schema},"payload":{plain}}}"#);
        for value in [&plain, &wrapped] {
            let Decoded::Change(e) = decode(None, Some(value)) else {
                panic!("{value} decodes to a change")
            };
            assert!(
                matches!(e.source_json, SourceText::InValue(_)),
                "{value}: {:?}",
                e.source_json
            );
            assert_eq!(e.source_text(), source);
        }
        // A block that is not a slice of the value keeps its own copy.
        let elsewhere: Box<RawValue> = serde_json::from_str(source).unwrap();
        let located = SourceText::locate(&elsewhere, &plain);
        assert!(matches!(&located, SourceText::Owned(b) if b.get() == source));
    }

    #[test]
    fn each_decode_error_has_its_metric_kind() {
        let kind = |key: Option<&str>, value: &[u8]| match Decoder::new().decode(
            coords(0),
            key.map(str::as_bytes),
            Some(value),
        ) {
            Decoded::Reject(r) => r.kind,
            other => panic!("expected a reject, got {other:?}"),
        };
        let source = r#""source":{"schema":"public","table":"t","lsn":1}"#;
        let deep = format!(
            "{}{}",
            "[".repeat(json::MAX_DEPTH + 1),
            "]".repeat(json::MAX_DEPTH + 1)
        );
        assert_eq!(kind(None, b"\xff\xfe"), "invalid_utf8");
        assert_eq!(kind(None, deep.as_bytes()), "too_deep");
        assert_eq!(kind(None, b"{not json"), "invalid_json");
        assert_eq!(kind(None, b"[1, 2]"), "not_an_envelope");
        assert_eq!(kind(None, br#"{"hello": 1}"#), "not_an_envelope");
        let op = |op: &str| format!(r#"{{"op":"{op}","after":{{"id":1}},{source}}}"#);
        assert_eq!(kind(None, op("x").as_bytes()), "unknown_op");
        assert_eq!(kind(Some("{bad"), op("c").as_bytes()), "invalid_key");
        assert_eq!(
            kind(None, br#"{"op":"c","after":{"id":1}}"#),
            "malformed_envelope"
        );
        let bad_schema = format!(r#"{{"schema":{{"type":"struct"}},"payload":{}}}"#, op("c"));
        assert_eq!(kind(None, bad_schema.as_bytes()), "bad_schema");
    }

    #[test]
    fn sequence_parses_both_lsns() {
        assert_eq!(
            parse_sequence("[null,\"26747456\"]"),
            (None, Some(26747456))
        );
        assert_eq!(
            parse_sequence("[\"35795464\",\"35795465\"]"),
            (Some(35795464), Some(35795465))
        );
        assert_eq!(parse_sequence("garbage"), (None, None));
    }

    #[test]
    fn bad_input_is_rejected_with_a_reason() {
        let cases = [
            ("{not json", "not valid JSON"),
            ("[1,2]", "not a JSON object"),
            ("{\"foo\":1}", "not a Debezium envelope"),
            ("{\"op\":\"x\",\"source\":{}}", "unknown op \"x\""),
            ("{\"op\":\"c\",\"after\":{\"a\":1}}", "no source block"),
            (
                "{\"op\":\"c\",\"source\":{\"schema\":\"s\",\"table\":\"t\"}}",
                "without an after image",
            ),
            (
                "{\"op\":\"c\",\"after\":5,\"source\":{\"schema\":\"s\",\"table\":\"t\"}}",
                "after is not an object",
            ),
        ];
        for (value, want) in cases {
            let got = reason(decode(Some("{\"id\":1}"), Some(value)));
            assert!(got.contains(want), "{value}: {got}");
        }
        assert!(reason(decode(None, Some("\u{0}\u{159}"))).contains("not valid JSON"));
    }

    #[test]
    fn tombstones_heartbeats_and_markers_are_skips() {
        let cases = [
            (None, SkipReason::Tombstone),
            (Some(""), SkipReason::Tombstone),
            (Some("{\"ts_ms\":1795239001549}"), SkipReason::Heartbeat),
            (Some("{\"status\":\"BEGIN\",\"id\":\"571:53195832\",\"event_count\":null,\"data_collections\":null,\"ts_ms\":1}"), SkipReason::TransactionMarker),
        ];
        for (value, want) in cases {
            match decode(Some("{\"id\":1}"), value) {
                Decoded::Skip(_, got) => assert_eq!(got, want, "{value:?}"),
                other => panic!("{value:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn snapshot_position_falls_back_to_change_lsn() {
        let v = r#"{"before":null,"after":{"id":1},"source":{"schema":"public","table":"t","lsn":7,"sequence":"[null,\"7\"]"},"op":"r","ts_ms":1}"#;
        let Decoded::Change(e) = decode(Some("{\"id\":1}"), Some(v)) else {
            panic!()
        };
        assert_eq!(
            e.position,
            Position {
                commit_lsn: 7,
                change_lsn: 7,
                offset: 0
            }
        );
        assert_eq!(e.op, Op::Read);
        assert_eq!(e.key, Some(serde_json::json!({"id": 1})));
    }
}
