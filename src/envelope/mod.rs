//! Decoding at the edge: one Kafka record becomes a typed [`ChangeEvent`], a counted
//! [`Skip`], or a [`Reject`] with the reason. Nothing downstream reads the raw JSON again.

pub mod json;
pub mod schema;
pub mod value;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::domain::{KafkaCoordinates, Position, SourceDb, TableId};
pub use schema::{Column, ColumnType, RowSchema, TimeUnit};

/// Debezium's operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Create,
    Update,
    Delete,
    Truncate,
    Message,
}

impl Op {
    pub fn parse(code: &str) -> Option<Op> {
        Some(match code {
            "r" => Op::Read,
            "c" => Op::Create,
            "u" => Op::Update,
            "d" => Op::Delete,
            "t" => Op::Truncate,
            "m" => Op::Message,
            _ => return None,
        })
    }

    pub fn code(self) -> &'static str {
        match self {
            Op::Read => "r",
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
            Op::Message => "m",
        }
    }
}

/// The typed parts of Debezium's `source` block that the pipeline uses.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceInfo {
    pub connector: Option<String>,
    pub name: Option<String>,
    pub db: Option<String>,
    pub ts_ms: Option<i64>,
    pub snapshot: Option<String>,
    pub tx_id: Option<i64>,
    pub lsn: Option<i64>,
    pub sequence: Option<String>,
}

/// How the values of `before`/`after` are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueForm {
    /// As Debezium sent them (decimals as base64, times as epoch units, …).
    Debezium,
    /// Already converted for PostgreSQL, as the raw log stores them (a replay reads these).
    Sql,
}

/// One decoded change, with its Kafka coordinates.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub coords: KafkaCoordinates,
    /// The key payload (`{"id": …}`), without its Connect schema. None for keyless tables.
    pub key: Option<Value>,
    pub op: Op,
    pub table: TableId,
    pub before: Option<Map<String, Value>>,
    pub after: Option<Map<String, Value>>,
    pub values: ValueForm,
    pub source: SourceInfo,
    /// The whole `source` block as sent, kept verbatim for the raw log.
    pub source_json: Box<RawValue>,
    /// Debezium's `transaction` block as sent, when present.
    pub transaction: Option<Box<RawValue>>,
    /// Envelope `ts_ms`: when Debezium processed the change.
    pub ts_ms: Option<i64>,
    /// Column types of `before`/`after`, shared by every event with the same schema.
    pub schema: Arc<RowSchema>,
    pub position: Position,
    /// The record value exactly as received, so the lake can reproduce the envelope.
    pub raw_value: Arc<str>,
    pub raw_key: Option<Arc<str>>,
}

impl ChangeEvent {
    /// Source commit time (epoch ms), falling back to processing time then Kafka time.
    pub fn event_time_ms(&self) -> Option<i64> {
        self.source
            .ts_ms
            .or(self.ts_ms)
            .or(self.coords.timestamp_ms)
    }

    /// The source database this change came from (`source.name`, `source.db`).
    pub fn source_db(&self) -> SourceDb {
        SourceDb {
            server: self.source.name.clone().unwrap_or_default(),
            db: self.source.db.clone().unwrap_or_default(),
        }
    }

    /// The row image that carries the state: `after`, or `before` for deletes.
    pub fn row(&self) -> Option<&Map<String, Value>> {
        self.after.as_ref().or(self.before.as_ref())
    }

    /// `image` (`before` or `after`) with each value converted for PostgreSQL by its column type.
    /// TOAST placeholders stay when `keep_unavailable` (the raw log records what was sent) and
    /// are left out otherwise (the column did not change, so state keeps its stored value).
    pub fn sql_image<'a>(
        &self,
        image: &'a Map<String, Value>,
        keep_unavailable: bool,
    ) -> Result<Cow<'a, Map<String, Value>>, String> {
        // Most rows need no conversion (schemaless input, plain types): borrow them as they are.
        // Inferred types never convert; only declared (Connect) types can.
        let convert_types = self.values == ValueForm::Debezium && self.schema.declared;
        let converts = |(name, v): (&String, &Value)| {
            (!keep_unavailable && v.as_str() == Some(value::UNAVAILABLE_VALUE))
                || (convert_types
                    && self
                        .schema
                        .column(name)
                        .is_some_and(|c| value::converts(&c.ty, v)))
        };
        if self.values == ValueForm::Sql {
            self.check_replayed_json(image)?;
        }
        if !image.iter().any(converts) {
            return Ok(Cow::Borrowed(image));
        }
        let mut out = Map::with_capacity(image.len());
        for (name, v) in image {
            if v.as_str() == Some(value::UNAVAILABLE_VALUE) {
                if keep_unavailable {
                    out.insert(name.clone(), v.clone());
                }
                continue;
            }
            let converted = match self.schema.column(name).filter(|_| convert_types) {
                Some(c) => {
                    value::to_sql_json(&c.ty, v).map_err(|e| format!("column {name}: {e}"))?
                }
                None => v.clone(),
            };
            out.insert(name.clone(), converted);
        }
        Ok(Cow::Owned(out))
    }

    /// A replayed raw-log row keeps, as sent, a json document jsonb cannot hold (the live
    /// decoder refused to convert it): refuse it again, as the live mirror did, rather than
    /// store the document's text as a JSON string.
    fn check_replayed_json(&self, image: &Map<String, Value>) -> Result<(), String> {
        for (name, v) in image {
            let is_json = self
                .schema
                .column(name)
                .is_some_and(|c| c.ty == ColumnType::Json);
            if is_json && v.as_str().is_some_and(|s| s.contains("\\u0000")) {
                if let Err(e @ value::ValueError::JsonbNul) =
                    value::to_sql_json(&ColumnType::Json, v)
                {
                    return Err(format!("column {name}: {e}"));
                }
            }
        }
        Ok(())
    }

    /// Approximate in-memory size, for batching and lake buffers: the received text plus the
    /// parsed images, whose maps and strings cost several times the JSON text (measured with
    /// the 1M-event backlog in docs/performance.md), and fixed overhead.
    pub fn size_bytes(&self) -> usize {
        6 * self.raw_value.len() + self.raw_key.as_ref().map_or(0, |k| 2 * k.len()) + 512
    }
}

/// Records that are intentionally not stored, each counted under its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// A null value after a delete: Kafka compaction's marker, not a second delete.
    Tombstone,
    /// Debezium heartbeat records.
    Heartbeat,
    /// Transaction metadata (BEGIN/END) records.
    TransactionMarker,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Tombstone => "tombstone",
            SkipReason::Heartbeat => "heartbeat",
            SkipReason::TransactionMarker => "transaction_marker",
        }
    }
}

/// A record that cannot be decoded, kept byte for byte with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub coords: KafkaCoordinates,
    /// A short stable class of the reason, for metrics (`invalid_json`, `unknown_op`, …).
    pub kind: &'static str,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub reason: String,
}

/// What one Kafka record decodes to.
#[derive(Debug, Clone)]
pub enum Decoded {
    Change(Arc<ChangeEvent>),
    Skip(KafkaCoordinates, SkipReason),
    Reject(Reject),
}

impl Decoded {
    pub fn coords(&self) -> &KafkaCoordinates {
        match self {
            Decoded::Change(e) => &e.coords,
            Decoded::Skip(c, _) => c,
            Decoded::Reject(r) => &r.coords,
        }
    }
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
/// schema in every record, costs one parse per distinct schema.
#[derive(Default)]
pub struct Decoder {
    schemas: HashMap<u64, Arc<RowSchema>>,
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
            Err(reason) => Decoded::Reject(Reject {
                kind: reject_kind(&reason),
                coords,
                key: key.map(<[u8]>::to_vec),
                value: Some(value.to_vec()),
                reason,
            }),
        }
    }

    fn decode_value(
        &mut self,
        coords: &KafkaCoordinates,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<Decoded, String> {
        let text = std::str::from_utf8(value).map_err(|e| format!("value is not UTF-8: {e}"))?;
        if let Some(depth) = json::exceeds_depth(value, json::MAX_DEPTH) {
            return Err(json::too_deep_reason("the value", depth));
        }
        if let Some(depth) = key.and_then(|k| json::exceeds_depth(k, json::MAX_DEPTH)) {
            return Err(json::too_deep_reason("the record key", depth));
        }
        let outer = parse_wire(text)?;
        // {schema, payload} form: the row types come from the schema.
        let (wire, connect_schema) = match outer.payload {
            Some(p) if outer.op.is_none() && outer.source.is_none() => {
                if !p.get().trim_start().starts_with('{') {
                    return Err("envelope payload is not a JSON object".into());
                }
                (parse_wire(p.get())?, outer.schema)
            }
            _ => (outer, None),
        };

        let Some(op_value) = &wire.op else {
            return classify_non_change(coords, text);
        };
        let op_code = op_value
            .as_str()
            .ok_or("envelope field op is not a string")?;
        let op = Op::parse(op_code).ok_or_else(|| format!("unknown op {op_code:?}"))?;

        let source_raw = wire.source.ok_or("envelope has no source block")?;
        let (source, mut table) = parse_source(source_raw)?;
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
                return Err(format!("op {op_code:?} without an after image"))
            }
            Op::Delete if before.is_none() && key.is_none() => {
                return Err("delete without a before image or a key".into())
            }
            _ => {}
        }

        let row_schema = match connect_schema {
            // A message's Connect schema has no row struct; its block is typed by inference.
            Some(_) if op == Op::Message => {
                Arc::new(RowSchema::infer_change(before.as_ref(), after.as_ref()))
            }
            Some(s) => self.connect_schema(s)?,
            None => Arc::new(RowSchema::infer_change(before.as_ref(), after.as_ref())),
        };

        let (raw_key, key_payload) = match key {
            None => (None, None),
            Some(k) => {
                let text = String::from_utf8_lossy(k);
                let parsed = match json::from_str::<Value>(&text) {
                    Ok(Value::Object(mut m))
                        if m.contains_key("payload") && m.contains_key("schema") =>
                    {
                        m.remove("payload")
                    }
                    Ok(v) => Some(v),
                    Err(e) => return Err(format!("record key is not valid JSON: {e}")),
                };
                (
                    Some(Arc::<str>::from(text.as_ref())),
                    parsed.filter(|v| !v.is_null()),
                )
            }
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
            source_json: source_raw.to_owned(),
            transaction: wire.transaction.map(ToOwned::to_owned),
            ts_ms: wire.ts_ms.as_ref().and_then(Value::as_i64),
            schema: row_schema,
            raw_value: Arc::from(text),
            raw_key,
        })))
    }

    fn connect_schema(&mut self, schema: &RawValue) -> Result<Arc<RowSchema>, String> {
        use std::hash::{Hash, Hasher};
        // Keyed by the schema's text as received: one parse per distinct schema.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        schema.get().hash(&mut h);
        let id = h.finish();
        if let Some(s) = self.schemas.get(&id) {
            return Ok(s.clone());
        }
        let value: Value = serde_json::from_str(schema.get())
            .map_err(|e| format!("Connect schema is not valid JSON: {e}"))?;
        let parsed = RowSchema::from_connect_envelope(&value)
            .ok_or("Connect schema has no before/after struct")?;
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

/// Maps a reason to its metric class.
fn reject_kind(reason: &str) -> &'static str {
    const KINDS: &[(&str, &str)] = &[
        ("not UTF-8", "invalid_utf8"),
        ("not valid JSON", "invalid_json"),
        ("key is not valid JSON", "invalid_key"),
        ("not a JSON object", "not_an_envelope"),
        ("not a Debezium envelope", "not_an_envelope"),
        ("unknown op", "unknown_op"),
        ("Connect schema", "bad_schema"),
        ("levels deep", "too_deep"),
    ];
    KINDS
        .iter()
        .find(|(needle, _)| reason.contains(needle))
        .map_or("malformed_envelope", |(_, kind)| kind)
}

/// The fields of an envelope (either form), borrowing what is stored verbatim.
#[derive(Deserialize)]
struct WireEnvelope<'a> {
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    before: Option<Value>,
    #[serde(default)]
    after: Option<Value>,
    #[serde(borrow, default)]
    source: Option<&'a RawValue>,
    #[serde(default)]
    op: Option<Value>,
    #[serde(default)]
    ts_ms: Option<Value>,
    #[serde(borrow, default)]
    transaction: Option<&'a RawValue>,
    /// Logical decoding messages (op `m`): `{prefix, content}`.
    #[serde(default)]
    message: Option<Value>,
}

fn parse_wire(text: &str) -> Result<WireEnvelope<'_>, String> {
    json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            format!("value is not a JSON object, so not a Debezium envelope: {e}")
        }
        _ => format!("value is not valid JSON: {e}"),
    })
}

/// Envelopes without `op`: Debezium heartbeats and transaction markers are skips; anything else
/// is not an envelope. (A rare path: the value is parsed again, whole.)
fn classify_non_change(coords: &KafkaCoordinates, text: &str) -> Result<Decoded, String> {
    let payload: Map<String, Value> = match json::from_str::<Map<String, Value>>(text) {
        Ok(mut m) => match m.remove("payload") {
            Some(Value::Object(p)) => p,
            Some(other) => {
                m.insert("payload".into(), other);
                m
            }
            None => m,
        },
        Err(e) => return Err(format!("value is not a JSON object: {e}")),
    };
    if payload.contains_key("status") && payload.contains_key("id") {
        return Ok(Decoded::Skip(coords.clone(), SkipReason::TransactionMarker));
    }
    if payload.len() == 1 && payload.get("ts_ms").is_some_and(Value::is_i64) {
        return Ok(Decoded::Skip(coords.clone(), SkipReason::Heartbeat));
    }
    Err("JSON object is not a Debezium envelope (no op field)".into())
}

fn into_row(v: Option<Value>, field: &str) -> Result<Option<Map<String, Value>>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(format!("envelope field {field} is not an object")),
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
