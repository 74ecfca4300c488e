//! Domain newtypes shared by every stage: Kafka coordinates, offsets, source tables, positions
//! and checked SQL identifiers.

use std::collections::HashMap;
use std::fmt;

/// A Kafka topic-partition: the unit of ordering, ownership and checkpointing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// A next offset to read per topic-partition: what a sink has made durable, or what the
/// consumer commits.
pub type Offsets = HashMap<TopicPartition, i64>;

/// A partition's log: the first offset it still holds, and the next offset it will give (the
/// high watermark, or one past the last record seen where the broker reports less). A sink
/// checkpoint past `end` counts records this log never gave: the log started over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    pub start: i64,
    pub end: i64,
}

/// Where one record sits in Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaCoordinates {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Broker or producer timestamp, epoch milliseconds.
    pub timestamp_ms: Option<i64>,
}

impl KafkaCoordinates {
    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition::new(self.topic.clone(), self.partition)
    }
}

/// A source table, `schema.table` as Debezium names it in `source`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableId {
    pub schema: String,
    pub table: String,
}

impl TableId {
    pub fn new(schema: impl Into<String>, table: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            table: table.into(),
        }
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// The database a change came from: Debezium's logical server name (`source.name`, the
/// connector's `topic.prefix`) and the database name (`source.db`). Empty when the envelope
/// does not say (hand-made records).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceDb {
    pub server: String,
    pub db: String,
}

impl fmt::Display for SourceDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = if self.server.is_empty() {
            "?"
        } else {
            &self.server
        };
        let db = if self.db.is_empty() { "?" } else { &self.db };
        write!(f, "server {server}, database {db}")
    }
}

/// The source ordering of a change, compared lexicographically: (commit LSN, change LSN, Kafka
/// offset).
///
/// Debezium's `source.sequence` is `[last_commit_lsn, change_lsn]`; the commit LSN is null in a
/// snapshot and for the first transaction after a connector start, so it falls back to the change
/// LSN. For one key both components only grow: a later change to a row cannot start before the
/// earlier writer committed (row locks), so `coalesce(commit, change)` is monotonic per key. The
/// Kafka offset breaks ties between records that share an LSN (snapshot reads do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub commit_lsn: i64,
    pub change_lsn: i64,
    pub offset: i64,
}

/// A plain identifier: ASCII letters, digits and `_`, not starting with a digit, at most 63
/// bytes (PostgreSQL's limit).
pub fn is_plain_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A name PostgreSQL can hold as an identifier (1 to 63 bytes, no NUL), kept with its quoted
/// form. SQL text is built from these only, so a name that reaches a statement has been
/// checked once, where it entered, and never needs checking again. `Display` writes the quoted
/// form; [`Ident::name`] is the name itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident {
    name: String,
    quoted: String,
}

/// Why a name cannot be a PostgreSQL identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} cannot be a PostgreSQL identifier")]
pub struct BadIdent(pub String);

impl Ident {
    /// Checks `name` and quotes it: `"` doubles and the result is always quoted, so names like
    /// `order` or `MixedCase` keep their meaning.
    pub fn new(name: impl Into<String>) -> Result<Self, BadIdent> {
        let name = name.into();
        if name.is_empty() || name.len() > 63 || name.contains('\0') {
            return Err(BadIdent(name));
        }
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        Ok(Self { name, quoted })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn quoted(&self) -> &str {
        &self.quoted
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.quoted)
    }
}

impl PartialEq<str> for Ident {
    fn eq(&self, other: &str) -> bool {
        self.name == other
    }
}
