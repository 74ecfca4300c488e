//! Confluent-framed Avro, as Debezium publishes it with the Avro converter and a Schema
//! Registry: magic byte 0, a 4-byte big-endian schema id, then the Avro binary datum.
//!
//! A writer schema (the JSON a registry serves at `GET /schemas/ids/{id}`) is compiled once into
//! a decoding plan and into the Kafka Connect schema it stands for. Decoding a datum yields the
//! payload exactly as Connect's `JsonConverter` would have written it (decimals and bytes as
//! base64, non-finite floats as `"NaN"`/`"Infinity"`, unions unwrapped), so the Avro path ends in
//! the same typed [`ChangeEvent`](super::ChangeEvent) as the `{schema, payload}` JSON path, with
//! the same column types: Debezium's semantic types come from the `connect.name`,
//! `connect.parameters` and `logicalType` attributes of the schema JSON itself. (The
//! `apache-avro` crate drops custom attributes on primitive types, apache/avro-rs#368, so it is
//! not used.)

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

mod datum;
mod parts;
mod schema;

use super::decode::{ReceivedKey, RowTypes, WireEnvelope};
use super::{AvroRecord, Decoded, Decoder, RowSchema};
use crate::domain::KafkaCoordinates;
use datum::Reader;
use schema::{compile, connect_schema, Typed};

/// The first byte of a Confluent-framed record.
pub const MAGIC: u8 = 0;

/// Why bytes are not a decodable Avro record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AvroError {
    #[error("not Confluent-framed Avro: {0}")]
    Framing(String),
    #[error("the writer schema cannot be read: {0}")]
    Schema(String),
    #[error("the bytes do not decode against writer schema {id}: {reason}")]
    Datum { id: u32, reason: String },
}

/// The schema id and the Avro datum of a framed record.
pub fn unframe(bytes: &[u8]) -> Result<(u32, &[u8]), AvroError> {
    match bytes {
        [MAGIC, a, b, c, d, datum @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        [MAGIC, ..] => Err(AvroError::Framing(format!(
            "{} bytes, fewer than the 5 of the magic byte and schema id",
            bytes.len()
        ))),
        [other, ..] => Err(AvroError::Framing(format!(
            "magic byte is {other:#04x}, not 0x00"
        ))),
        [] => Err(AvroError::Framing("empty".into())),
    }
}

/// JsonConverter's `{schema, payload}` text from a Connect schema's text and a payload's.
pub fn json_converter_envelope(connect_schema: &str, payload: &str) -> String {
    let mut text = String::with_capacity(connect_schema.len() + payload.len() + 24);
    text.push_str(r#"{"schema":"#);
    text.push_str(connect_schema);
    text.push_str(r#","payload":"#);
    text.push_str(payload);
    text.push('}');
    text
}

/// A compiled writer schema.
#[derive(Debug, Clone)]
pub struct WriterSchema {
    id: u32,
    /// The schema as the registry served it.
    text: String,
    root: Typed,
    connect: Value,
    /// `connect` as JSON text: the schema half of the envelope's JSON rendering.
    connect_text: String,
    /// The row's column types, when the schema is a change envelope's.
    row_schema: Option<Arc<RowSchema>>,
}

impl WriterSchema {
    /// Compiles the schema JSON a registry serves for `id`.
    pub fn parse(id: u32, text: &str) -> Result<Self, AvroError> {
        let json: Value = serde_json::from_str(text)
            .map_err(|e| AvroError::Schema(format!("schema {id} is not JSON: {e}")))?;
        let mut named = HashMap::new();
        let root = compile(&json, None, &mut named)
            .map_err(|e| AvroError::Schema(format!("schema {id}: {e}")))?;
        let connect = connect_schema(&root, None);
        Ok(Self {
            id,
            text: text.to_string(),
            root,
            connect_text: connect.to_string(),
            row_schema: RowSchema::from_connect_envelope(&connect).map(Arc::new),
            connect,
        })
    }

    /// The registry's id of this schema.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The schema JSON as the registry served it.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The Kafka Connect schema (JsonConverter's JSON form) this Avro schema stands for.
    pub fn connect_schema(&self) -> &Value {
        &self.connect
    }

    /// [`WriterSchema::connect_schema`] as JSON text.
    pub fn connect_text(&self) -> &str {
        &self.connect_text
    }

    /// JsonConverter's `{schema, payload}` text of a record of this schema, from the payload's.
    pub fn envelope_json(&self, payload: &str) -> String {
        json_converter_envelope(&self.connect_text, payload)
    }

    /// Decodes one datum (the bytes after the framing) into JsonConverter's payload form.
    /// Every byte must belong to the datum.
    pub fn decode(&self, datum: &[u8]) -> Result<Value, AvroError> {
        let mut reader = Reader {
            bytes: datum,
            pos: 0,
        };
        let value = reader
            .value(&self.root)
            .map_err(|reason| AvroError::Datum {
                id: self.id,
                reason,
            })?;
        if reader.pos != datum.len() {
            return Err(AvroError::Datum {
                id: self.id,
                reason: format!("{} bytes left after the datum", datum.len() - reader.pos),
            });
        }
        Ok(value)
    }
}

/// What a lookup of a writer schema by id found.
pub enum Lookup {
    Found(Arc<WriterSchema>),
    /// The registry does not know the id (404): the record is rejected with its bytes.
    Unknown(String),
}

impl Decoder {
    /// Decodes a Confluent-framed Avro record (key and value) to the same [`Decoded`] as the
    /// JSON path would for JsonConverter's `{schema, payload}` rendering of the record, without
    /// rendering and parsing that text: the decoded envelope goes straight to the checks every
    /// envelope gets. A record that is not framed Avro, names an unknown schema id or does not
    /// decode is rejected with the reason and its exact bytes. `lookup` fails only when the
    /// schema cannot be fetched now (the registry is down): the caller retries the record.
    pub fn decode_avro<E>(
        &mut self,
        coords: KafkaCoordinates,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        mut lookup: impl FnMut(u32) -> Result<Lookup, E>,
    ) -> Result<Decoded, E> {
        let Some(value_bytes) = value.filter(|v| !v.is_empty()) else {
            return Ok(self.decode(coords, key, None));
        };
        // One side (key or value) decoded, with the writer schema it names.
        let mut datum = |bytes: &[u8]| -> Result<Result<(Value, Arc<WriterSchema>), String>, E> {
            let (id, datum) = match unframe(bytes) {
                Ok(framed) => framed,
                Err(e) => return Ok(Err(e.to_string())),
            };
            let writer = match lookup(id)? {
                Lookup::Found(w) => w,
                Lookup::Unknown(reason) => return Ok(Err(format!("schema id {id}: {reason}"))),
            };
            Ok(writer
                .decode(datum)
                .map(|v| (v, writer))
                .map_err(|e| e.to_string()))
        };
        let decoded_key = match key {
            None => None,
            Some(k) => Some(datum(k)?),
        };
        let decoded_value = datum(value_bytes)?;
        let reject = |reason: String| {
            Decoded::Reject(super::Reject {
                coords: coords.clone(),
                kind: "invalid_avro",
                key: key.map(<[u8]>::to_vec),
                value: Some(value_bytes.to_vec()),
                reason,
            })
        };
        let (key_value, key_schema) = match decoded_key {
            Some(Err(reason)) => return Ok(reject(format!("record key: {reason}"))),
            Some(Ok((v, schema))) => (Some(v), Some(schema)),
            None => (None, None),
        };
        let (payload, value_schema) = match decoded_value {
            Err(reason) => return Ok(reject(reason)),
            Ok(decoded) => decoded,
        };
        let record = AvroRecord {
            key: key.map(<[u8]>::to_vec),
            value: value_bytes.to_vec(),
            key_schema,
            value_schema,
        };
        Ok(
            match self.avro_envelope(&coords, key_value, payload, &record) {
                // The envelope's own faults, reported with the bytes as received.
                Decoded::Reject(mut r) => {
                    r.key = record.key;
                    r.value = Some(record.value);
                    Decoded::Reject(r)
                }
                Decoded::Change(mut change) => {
                    // A change just decoded has one owner: this does not copy it.
                    Arc::make_mut(&mut change).avro = Some(Arc::new(record));
                    Decoded::Change(change)
                }
                skip @ Decoded::Skip(..) => skip,
            },
        )
    }

    /// A decoded envelope as a change. Records that are not changes (heartbeats, transaction
    /// markers, anything without an `op`) are rare: they take the JSON path through their
    /// JsonConverter rendering, which classifies them.
    fn avro_envelope(
        &mut self,
        coords: &KafkaCoordinates,
        key: Option<Value>,
        payload: Value,
        record: &AvroRecord,
    ) -> Decoded {
        let writer = &record.value_schema;
        let render_key = |k: &Value| k.to_string();
        // Serialising a Value cannot fail (its keys are strings).
        let payload_text = serde_json::to_string(&payload).unwrap_or_default();
        let mut fields = match payload {
            Value::Object(fields) if fields.get("op").is_some_and(|op| !op.is_null()) => fields,
            _ => {
                let key_text = key.as_ref().map(render_key);
                let rendered = writer.envelope_json(&payload_text);
                return self.decode(
                    coords.clone(),
                    key_text.as_deref().map(str::as_bytes),
                    Some(rendered.as_bytes()),
                );
            }
        };
        // `source` and `transaction` are kept verbatim as JSON; the rest moves as parsed.
        let as_raw = |v: Value| serde_json::value::to_raw_value(&v).ok();
        let source = fields
            .remove("source")
            .filter(|s| !s.is_null())
            .and_then(as_raw);
        let transaction = fields
            .remove("transaction")
            .filter(|t| !t.is_null())
            .and_then(as_raw);
        let wire = WireEnvelope {
            before: fields.remove("before"),
            after: fields.remove("after"),
            op: fields.remove("op"),
            ts_ms: fields.remove("ts_ms"),
            message: fields.remove("message"),
            source: source.as_deref(),
            transaction: transaction.as_deref(),
            ..WireEnvelope::default()
        };
        let key = key.map(|value| ReceivedKey::Decoded {
            text: Arc::from(render_key(&value)),
            value,
        });
        let types = RowTypes::Compiled(writer.row_schema.clone());
        // The payload's text only: the lake keeps each Connect schema once per file
        // (`sink::lake::encode::AVRO_CONNECT_SCHEMAS`), so an event carries no copy of it.
        self.change(coords, wire, types, key, &payload_text)
            .unwrap_or_else(|error| {
                Decoded::Reject(super::Reject {
                    kind: error.kind(),
                    coords: coords.clone(),
                    key: None,
                    value: None,
                    reason: error.to_string(),
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn zigzag(v: i64) -> Vec<u8> {
        let mut n = ((v << 1) ^ (v >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    #[test]
    fn framing_is_checked() {
        assert_eq!(unframe(&[0, 0, 0, 1, 2, 9]).unwrap(), (258, &[9u8][..]));
        assert!(unframe(&[1, 0, 0, 0, 1])
            .unwrap_err()
            .to_string()
            .contains("0x01"));
        assert!(unframe(&[0, 0, 1])
            .unwrap_err()
            .to_string()
            .contains("fewer than the 5"));
        assert!(unframe(&[]).is_err());
    }

    #[test]
    fn primitives_decode_to_json_converter_form() {
        let schema = r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"i","type":{"type":"int","connect.type":"int16"}},
            {"name":"l","type":"long"},
            {"name":"f","type":"float"},
            {"name":"d","type":"double"},
            {"name":"nan","type":"double"},
            {"name":"b","type":"bytes"},
            {"name":"s","type":["null","string"],"default":null},
            {"name":"t","type":[{"type":"long","connect.name":"io.debezium.time.MicroTimestamp"},"null"]},
            {"name":"m","type":{"type":"bytes","scale":2,"precision":10,"connect.version":1,
                "connect.parameters":{"scale":"2","connect.decimal.precision":"10"},
                "connect.name":"org.apache.kafka.connect.data.Decimal","logicalType":"decimal"}},
            {"name":"a","type":{"type":"array","items":"int"}},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["x","y"]}}]}"#;
        let w = WriterSchema::parse(7, schema).unwrap();
        let mut datum = Vec::new();
        datum.extend(zigzag(-300));
        datum.extend(zigzag(i64::MIN));
        datum.extend(2.5e-3f32.to_le_bytes());
        datum.extend(0.1f64.to_le_bytes());
        datum.extend(f64::NAN.to_le_bytes());
        datum.extend(zigzag(2));
        datum.extend([0xCA, 0xFE]);
        datum.extend(zigzag(1));
        datum.extend(zigzag(2));
        datum.extend(b"hi");
        datum.extend(zigzag(0));
        datum.extend(zigzag(1_700_000_000_000_000));
        datum.extend(zigzag(2));
        datum.extend([0x30, 0x39]);
        datum.extend(zigzag(-2)); // a block of 2 with its byte size
        datum.extend(zigzag(2));
        datum.extend(zigzag(5));
        datum.extend(zigzag(6));
        datum.extend(zigzag(0));
        datum.extend(zigzag(1));
        let v = w.decode(&datum).unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"i":-300,"l":-9223372036854775808,"f":0.0025,"d":0.1,"nan":"NaN","b":"yv4=","s":"hi","t":1700000000000000,"m":"MDk=","a":[5,6],"e":"y"}"#
        );
        let fields = &w.connect_schema()["fields"];
        assert_eq!(fields[0]["type"], "int16");
        assert_eq!(fields[6]["optional"], true);
        assert_eq!(fields[6]["type"], "string");
        assert_eq!(fields[7]["name"], "io.debezium.time.MicroTimestamp");
        assert_eq!(fields[7]["optional"], true);
        assert_eq!(fields[8]["name"], "org.apache.kafka.connect.data.Decimal");
        assert_eq!(fields[8]["parameters"]["scale"], "2");
        assert_eq!(fields[8]["parameters"]["connect.decimal.precision"], "10");
        assert_eq!(fields[9]["items"]["type"], "int32");
        assert_eq!(w.connect_schema()["name"], "n.R");
    }

    #[test]
    fn bad_datums_are_errors_not_panics() {
        let w = WriterSchema::parse(
            3,
            r#"{"type":"record","name":"R","fields":[
            {"name":"s","type":"string"},{"name":"u","type":["null","long"]}]}"#,
        )
        .unwrap();
        let cases: [(&[u8], &str); 5] = [
            (&[], "past the end"),
            (&[0x10, b'a'], "past the end"),
            (&[0x02, 0xff, 0x00], "not UTF-8"),
            (&[0x00, 0x04], "union branch 2"),
            (&[0x00, 0x00, 0x00], "1 bytes left"),
        ];
        for (datum, want) in cases {
            let err = w.decode(datum).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("schema 3"),
                "{want}: {err}"
            );
        }
        assert!(WriterSchema::parse(
            1,
            r#"{"type":"record","name":"R","fields":[{"name":"x","type":"Nope"}]}"#
        )
        .is_err());
        assert!(WriterSchema::parse(1, "{not json").is_err());
        // A recursive type could nest a datum without end (datum::Reader recurses per level).
        let recursive =
            r#"{"type":"record","name":"N","fields":[{"name":"next","type":["null","N"]}]}"#;
        assert!(WriterSchema::parse(1, recursive)
            .unwrap_err()
            .to_string()
            .contains("unknown type \"N\""));
    }

    #[test]
    fn named_types_are_reused_by_name() {
        let w = WriterSchema::parse(1, r#"{"type":"record","name":"Envelope","namespace":"ns","fields":[
            {"name":"before","type":["null",{"type":"record","name":"Value","fields":[{"name":"id","type":"int"}]}]},
            {"name":"after","type":["null","Value"]}]}"#)
        .unwrap();
        let datum = [0x02, 0x02, 0x02, 0x04];
        assert_eq!(
            w.decode(&datum).unwrap(),
            json!({"before": {"id": 1}, "after": {"id": 2}})
        );
        assert_eq!(w.connect_schema()["fields"][1]["type"], "struct");
        assert_eq!(w.connect_schema()["fields"][1]["name"], "ns.Value");
    }
}
