//! Decoding at the edge: one Kafka record becomes a typed [`ChangeEvent`], a counted
//! [`Skip`], or a [`Reject`] with the reason. Nothing downstream reads the raw JSON again.

pub mod avro;
mod decode;
pub mod json;
pub mod schema;
pub mod value;

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::domain::{KafkaCoordinates, Position, SourceDb, TableId};
pub use decode::{parse_source, DecodeError, Decoder};
pub use schema::{Column, ColumnType, InferredSchemas, RowSchema, TimeUnit};

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
    /// The whole `source` block as sent, kept verbatim for the raw log ([`Self::source_text`]).
    pub source_json: SourceText,
    /// Debezium's `transaction` block as sent, when present.
    pub transaction: Option<Box<RawValue>>,
    /// Envelope `ts_ms`: when Debezium processed the change.
    pub ts_ms: Option<i64>,
    /// Column types of `before`/`after`, shared by every event with the same schema.
    pub schema: Arc<RowSchema>,
    pub position: Position,
    /// The record value exactly as received, so the lake can reproduce the envelope; for an
    /// Avro record, the JSON text of its payload (JsonConverter's `{schema, payload}` is
    /// [`avro::WriterSchema::envelope_json`] of it).
    pub raw_value: Arc<str>,
    pub raw_key: Option<Arc<str>>,
    /// The record as received, when it arrived as Confluent-framed Avro.
    pub avro: Option<Arc<AvroRecord>>,
}

/// Where a change keeps its `source` block's text. A JSON record's value holds the block
/// verbatim, so the change keeps only where it lies in `raw_value` instead of a second copy (a
/// quarter of a bench envelope, for every change in flight).
#[derive(Debug, Clone)]
pub enum SourceText {
    /// Byte range of the block in the change's `raw_value`.
    InValue(std::ops::Range<usize>),
    /// Its own copy: Avro records and replayed changes, whose `raw_value` is built, not received.
    Owned(Box<RawValue>),
}

impl SourceText {
    /// `block` as a range of `value` when it is a slice of it (as a block parsed from the value
    /// is), else its own copy.
    pub fn locate(block: &RawValue, value: &str) -> Self {
        // A block from elsewhere gives an offset out of the value's bounds (or a wrapped, empty
        // range), which `get` refuses like any range off a character boundary.
        let start = (block.get().as_ptr() as usize).wrapping_sub(value.as_ptr() as usize);
        let end = start.wrapping_add(block.get().len());
        match value.get(start..end) {
            Some(_) => SourceText::InValue(start..end),
            None => SourceText::Owned(block.to_owned()),
        }
    }
}

/// A change that arrived as Confluent-framed Avro: the exact bytes and the writer schemas
/// they name, so the raw log and the lake keep the record independently of the registry.
#[derive(Debug)]
pub struct AvroRecord {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub key_schema: Option<Arc<avro::WriterSchema>>,
    pub value_schema: Arc<avro::WriterSchema>,
}

impl ChangeEvent {
    /// Debezium's `source` block as sent (JSON text).
    pub fn source_text(&self) -> &str {
        match &self.source_json {
            SourceText::InValue(range) => &self.raw_value[range.clone()],
            SourceText::Owned(block) => block.get(),
        }
    }

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

    /// The record value's bytes as received: the Avro bytes, or the JSON text.
    pub fn received_value(&self) -> &[u8] {
        match &self.avro {
            Some(a) => &a.value,
            None => self.raw_value.as_bytes(),
        }
    }

    /// The record key's bytes as received, when there is a key.
    pub fn received_key(&self) -> Option<&[u8]> {
        match &self.avro {
            Some(a) => a.key.as_deref(),
            None => self.raw_key.as_deref().map(str::as_bytes),
        }
    }

    /// Approximate in-memory size, for batching and lake buffers: the received text plus the
    /// parsed images, whose maps and strings cost several times the JSON text (measured with
    /// the 1M-event backlog in docs/performance.md), and fixed overhead.
    pub fn size_bytes(&self) -> usize {
        // An Avro record also holds its bytes.
        let avro = self
            .avro
            .as_ref()
            .map_or(0, |a| a.value.len() + a.key.as_ref().map_or(0, Vec::len));
        6 * self.raw_value.len() + self.raw_key.as_ref().map_or(0, |k| 2 * k.len()) + avro + 512
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

    /// Approximate in-memory size: what batches, the poll thread's chunks and the lanes count
    /// against their byte limits.
    pub fn size_bytes(&self) -> usize {
        match self {
            Decoded::Change(e) => e.size_bytes(),
            Decoded::Reject(r) => {
                r.value.as_ref().map_or(0, Vec::len) + r.key.as_ref().map_or(0, Vec::len)
            }
            Decoded::Skip(..) => 64,
        }
    }
}
