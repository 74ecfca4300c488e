//! Sinks: the raw log, the lake and the current-state mirrors.
//!
//! # The contract every sink keeps
//!
//! - **Checkpoints live with the data.** A sink stores, per topic-partition, the next offset it
//!   needs, atomically with the data it wrote (same transaction, or a manifest entry written
//!   after the object is uploaded). [`Sink::checkpoints`] reads it back.
//! - **Idempotent per offset.** [`Sink::write`] skips every record below the sink's checkpoint,
//!   so redelivery after a crash or rebalance never writes a record twice.
//! - **An acknowledgement means durable.** The offsets a sink returns from `write`/`flush` are
//!   safe to commit to Kafka: they are on disk (or in the bucket) and recorded.
//! - **No writes after revocation.** [`Sink::revoke`] drops anything buffered for partitions this
//!   consumer no longer owns.
//!
//! Every sink passes the same conformance suite (`tests/sink_conformance.rs`).

pub mod checkpoint;
pub mod coerce;
pub mod ident;
pub mod lake;
pub mod mapping;
pub mod memory;
pub mod raw;
pub mod route;
pub mod state;

use std::collections::HashMap;
use std::future::Future;

use crate::batch::Batch;
use crate::domain::{LogBounds, TopicPartition};
use crate::envelope::{ChangeEvent, Decoded};

pub use crate::db::pg_detail;
pub use crate::domain::Offsets;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{sink}: PostgreSQL error while {context}: {}", pg_detail(source))]
    Postgres {
        sink: &'static str,
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{sink}: Kafka error while {context}: {source}")]
    Kafka {
        sink: &'static str,
        context: String,
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    #[error("lake: object store error at {path}: {source}")]
    ObjectStore {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot encode {table}: {reason}")]
    Encode { table: String, reason: String },
    /// A value of one change cannot be converted for its column (bad data, not an outage).
    #[error("cannot convert a value of {table}: {reason}")]
    Value { table: String, reason: String },
    /// A Delta log could not be read or committed to (the manifest commit has landed; the
    /// table catches up on the retry or the next assignment).
    #[error("lake: Delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: Box<deltalake_core::DeltaTableError>,
    },
    #[error("lake: manifest {path} is corrupt: {reason}")]
    Manifest { path: String, reason: String },
    /// A target's setup SQL or mappings do not fit its database: a configuration problem.
    #[error("{target}: {reason}")]
    Mapping {
        target: &'static str,
        reason: String,
    },
    #[error("{sink}: {tp} moved to another owner (checkpoint {theirs} is ahead of ours)")]
    Fenced {
        sink: &'static str,
        tp: TopicPartition,
        theirs: i64,
    },
    /// The schema registry cannot register an output schema now.
    #[error("{sink}: {source}")]
    Registry {
        sink: &'static str,
        #[source]
        source: crate::source::registry::RegisterError,
    },
    /// A batch does not continue from the stored checkpoint: advancing would skip records.
    #[error("{sink}: {tp} has a gap: the stored checkpoint is {stored} but the batch continues from {batch_start}; not advancing past records this sink never stored")]
    CheckpointGap {
        sink: &'static str,
        tp: TopicPartition,
        stored: i64,
        batch_start: i64,
    },
}

/// What an error means for the record and the pod: the one place that decides retry, reject
/// or stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A dependency is down or busy: retry with backoff, not ready meanwhile.
    Transient,
    /// The data of some record cannot be stored by this sink: narrow it down to the record and
    /// reject it at this sink's stage; the others move on.
    BadData,
    /// Configuration or permissions: retrying cannot help; stop with the message.
    Fatal,
}

/// The class of a PostgreSQL error by its SQLSTATE.
pub fn classify_sqlstate(code: Option<&str>) -> ErrorClass {
    let Some(c) = code else {
        // No SQLSTATE: the connection failed or closed.
        return ErrorClass::Transient;
    };
    match c {
        // Invalid authorization, insufficient privilege, missing database or schema: an
        // operator has to act.
        _ if c.starts_with("28") => ErrorClass::Fatal,
        "42501" | "3D000" | "3F000" => ErrorClass::Fatal,
        // Data exceptions (22: NUL, out-of-range, bad syntax for the type), integrity (23,
        // including a unique violation a retry inside the transaction still hits), cardinality
        // (21000: two staged rows for one target row), program limits (54: too many columns,
        // index row too large), and names a record brings (42701 duplicate column, 42702
        // ambiguous, 42804 datatype mismatch, 42622 name too long).
        _ if c.starts_with("22") || c.starts_with("23") || c.starts_with("54") => {
            ErrorClass::BadData
        }
        "21000" | "42701" | "42702" | "42804" | "42622" | "42P16" => ErrorClass::BadData,
        // Connection (08), rollback (40: serialization, deadlock), resources (53), operator
        // intervention (57), lock not available (55P03), system errors (58), and anything
        // unknown: retry, never drop.
        _ => ErrorClass::Transient,
    }
}

impl SinkError {
    /// See [`ErrorClass`].
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::Postgres { source, .. } => {
                classify_sqlstate(source.code().map(|c| c.code()))
            }
            SinkError::ObjectStore { .. }
            | SinkError::Delta { .. }
            | SinkError::Kafka { .. }
            | SinkError::Registry { .. } => ErrorClass::Transient,
            SinkError::Encode { .. } | SinkError::Value { .. } => ErrorClass::BadData,
            SinkError::Mapping { .. } => ErrorClass::Fatal,
            // A corrupt manifest needs an operator, but the pod keeps retrying (and stays not
            // ready) rather than exit: the objects may be mid-repair. A fence or a gap resolves
            // by a rebalance or a restart from the stored checkpoint.
            SinkError::Manifest { .. }
            | SinkError::Fenced { .. }
            | SinkError::CheckpointGap { .. } => ErrorClass::Transient,
        }
    }

    /// Whether retrying the same write can succeed (a dependency is down or busy).
    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// True when the connection itself is gone and the sink must reconnect.
    pub fn needs_reconnect(&self) -> bool {
        matches!(self, SinkError::Postgres { source, .. } if source.is_closed() || source.code().is_none())
    }
}

/// Opens a PostgreSQL connection for a sink.
pub(crate) async fn connect(
    pg: &crate::config::PostgresConfig,
    sink: &'static str,
) -> Result<tokio_postgres::Client, SinkError> {
    crate::db::connect(pg, &format!("cdc-lake {sink}"))
        .await
        .map_err(|e| SinkError::Postgres {
            sink,
            context: format!("connecting to {}", e.target),
            source: e.source,
        })
}

/// Moves the rejects of `stages` at or above `from` on `tp` to `cdc_raw.cdc_rejects_superseded`,
/// when the partition's log started over and its new records reuse those offsets.
pub(crate) async fn supersede_rejects(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &'static str,
    stages: &[&str],
    tp: &TopicPartition,
    from: i64,
) -> Result<u64, SinkError> {
    tx.execute(
        "WITH moved AS (
             DELETE FROM cdc_raw.cdc_rejects
              WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset >= $3
                AND stage = ANY($4)
             RETURNING *)
         INSERT INTO cdc_raw.cdc_rejects_superseded SELECT * FROM moved",
        &[&tp.topic, &tp.partition, &from, &stages],
    )
    .await
    .map_err(|source| SinkError::Postgres {
        sink,
        context: "moving the old log's rejects aside".into(),
        source,
    })
}

/// Records a change that sink `sink` cannot take in `cdc_raw.cdc_rejects`, at `stage`, with the
/// reason, in the sink's own transaction (so the reject and the checkpoint commit together).
pub(crate) async fn record_reject(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &'static str,
    stage: &str,
    e: &ChangeEvent,
    reason: &str,
) -> Result<(), SinkError> {
    tx.execute(
        "INSERT INTO cdc_raw.cdc_rejects
             (kafka_topic, kafka_partition, kafka_offset, kafka_timestamp, raw_key, raw_value, stage, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT DO NOTHING",
        &[
            &e.coords.topic,
            &e.coords.partition,
            &e.coords.offset,
            &crate::db::pg_timestamp(e.coords.timestamp_ms),
            &e.received_key(),
            &e.received_value(),
            &stage,
            &crate::db::pg_text(reason).as_ref(),
        ],
    )
    .await
    .map_err(|source| SinkError::Postgres {
        sink,
        context: "recording a reject".into(),
        source,
    })?;
    Ok(())
}

/// Counters of what one write did, for metrics and logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteStats {
    /// Records stored by this write.
    pub written: u64,
    /// Records below the sink's checkpoint (already stored earlier).
    pub already_stored: u64,
    /// Records this sink does not store (rejects, skips, ops it ignores), by reason.
    pub ignored: HashMap<&'static str, u64>,
}

impl WriteStats {
    /// The change `r` holds, or `None` after counting a decode reject or a skip as ignored:
    /// what every sink does with the records that are not changes.
    pub fn change<'a>(&mut self, r: &'a Decoded) -> Option<&'a std::sync::Arc<ChangeEvent>> {
        match r {
            Decoded::Change(e) => Some(e),
            Decoded::Reject(_) => {
                *self.ignored.entry("rejected").or_default() += 1;
                None
            }
            Decoded::Skip(_, reason) => {
                *self.ignored.entry(reason.as_str()).or_default() += 1;
                None
            }
        }
    }
}

/// What a write or flush reports back.
#[derive(Debug, Default, Clone)]
pub struct Ack {
    /// Per partition: the next offset that is durable in this sink (safe to commit).
    pub durable: Offsets,
    pub stats: WriteStats,
}

/// A destination for decoded records. See the module docs for the contract.
pub trait Sink: Send {
    /// Short stable name: used in metrics, logs and the checkpoint row.
    fn name(&self) -> &'static str;

    /// The stored checkpoint (next offset needed) for each partition that has one.
    fn checkpoints(
        &mut self,
        partitions: &[TopicPartition],
    ) -> impl Future<Output = Result<Offsets, SinkError>> + Send;

    /// Stores the batch's records at or above this sink's checkpoint, with the new checkpoint.
    fn write(&mut self, batch: &Batch) -> impl Future<Output = Result<Ack, SinkError>> + Send;

    /// Makes buffered data durable: all of it when `force`, else only what is due (age limits).
    fn flush(&mut self, force: bool) -> impl Future<Output = Result<Ack, SinkError>> + Send;

    /// Forgets buffered data of partitions this consumer no longer owns. Nothing is written.
    fn revoke(&mut self, partitions: &[TopicPartition]);

    /// Takes up a partition whose log started over: this sink's checkpoint is past the log's
    /// end (`stale` > `log.end`), so every record of the new log would otherwise pass
    /// as already stored. Moves the checkpoint back to the log's start in one transaction,
    /// keeping what the old log left (moved aside where the new log reuses its offsets), and
    /// returns the checkpoint now stored. `None`: this sink cannot, and keeps its checkpoint;
    /// the pipeline reports it.
    fn rebase(
        &mut self,
        tp: &TopicPartition,
        stale: i64,
        log: LogBounds,
    ) -> impl Future<Output = Result<Option<i64>, SinkError>> + Send {
        let _ = (tp, stale, log);
        async { Ok(None) }
    }
}

/// Narrows a failed set of records down to the ones that cause a [`ErrorClass::BadData`]
/// error, by bisection: each half is tried again (inside its own savepoint, by the caller),
/// halves that work stay applied, and a single record that still fails is the culprit. One bad
/// record in a batch of n costs about 2·log2(n) attempts; ranges come out in record order, so
/// changes to one key keep their order.
#[derive(Debug)]
pub struct Bisect {
    todo: Vec<std::ops::Range<usize>>,
}

impl Bisect {
    /// Starts with the whole set `0..n`.
    pub fn new(n: usize) -> Self {
        Self {
            todo: if n == 0 {
                Vec::new()
            } else {
                std::iter::once(0..n).collect()
            },
        }
    }

    /// The next range to try, in record order.
    pub fn next_range(&mut self) -> Option<std::ops::Range<usize>> {
        self.todo.pop()
    }

    /// The attempt at `range` failed for a cause that has since been removed: it is tried
    /// again whole, next.
    pub fn retry(&mut self, range: std::ops::Range<usize>) {
        self.todo.push(range);
    }

    /// The attempt at `range` failed on bad data: its halves are tried next, or, for a single
    /// record, that record is returned as the one to reject.
    pub fn failed(&mut self, range: std::ops::Range<usize>) -> Option<usize> {
        if range.len() <= 1 {
            return Some(range.start);
        }
        let mid = range.start + range.len() / 2;
        self.todo.push(mid..range.end);
        self.todo.push(range.start..mid);
        None
    }
}

/// A savepoint in a sink's transaction, around a step that may fail on data (one attempt of a
/// narrowing, a truncate, a column change): [`Savepoint::release`] keeps what the step did,
/// [`Savepoint::rollback`] undoes it and the transaction goes on. Dropped without either (a
/// connection error), the transaction is lost anyway.
pub(crate) struct Savepoint<'a, 't> {
    tx: &'a tokio_postgres::Transaction<'t>,
    sink: &'static str,
    name: &'static str,
}

impl<'a, 't> Savepoint<'a, 't> {
    /// `name` is a plain SQL identifier (a constant at each call site).
    pub(crate) async fn begin(
        tx: &'a tokio_postgres::Transaction<'t>,
        sink: &'static str,
        name: &'static str,
    ) -> Result<Self, SinkError> {
        let savepoint = Self { tx, sink, name };
        savepoint.run(&format!("SAVEPOINT {name}")).await?;
        Ok(savepoint)
    }

    pub(crate) async fn release(self) -> Result<(), SinkError> {
        self.run(&format!("RELEASE SAVEPOINT {}", self.name)).await
    }

    pub(crate) async fn rollback(self) -> Result<(), SinkError> {
        let name = self.name;
        self.run(&format!(
            "ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"
        ))
        .await
    }

    async fn run(&self, command: &str) -> Result<(), SinkError> {
        self.tx
            .batch_execute(command)
            .await
            .map_err(|source| SinkError::Postgres {
                sink: self.sink,
                context: command.to_lowercase(),
                source,
            })
    }
}

/// The configured sinks behind one type, so the loop can drive them together.
pub enum AnySink {
    Raw(raw::RawSink),
    Lake(lake::LakeSink),
    State(state::StateSink),
    Route(route::RouteSink),
    Memory(memory::MemorySink),
}

macro_rules! each_sink {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            AnySink::Raw($s) => $body,
            AnySink::Lake($s) => $body,
            AnySink::State($s) => $body,
            AnySink::Route($s) => $body,
            AnySink::Memory($s) => $body,
        }
    };
}

impl Sink for AnySink {
    fn name(&self) -> &'static str {
        each_sink!(self, s => s.name())
    }
    async fn checkpoints(&mut self, partitions: &[TopicPartition]) -> Result<Offsets, SinkError> {
        each_sink!(self, s => s.checkpoints(partitions).await)
    }
    async fn write(&mut self, batch: &Batch) -> Result<Ack, SinkError> {
        each_sink!(self, s => s.write(batch).await)
    }
    async fn flush(&mut self, force: bool) -> Result<Ack, SinkError> {
        each_sink!(self, s => s.flush(force).await)
    }
    fn revoke(&mut self, partitions: &[TopicPartition]) {
        each_sink!(self, s => s.revoke(partitions))
    }
    async fn rebase(
        &mut self,
        tp: &TopicPartition,
        stale: i64,
        log: LogBounds,
    ) -> Result<Option<i64>, SinkError> {
        each_sink!(self, s => s.rebase(tp, stale, log).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a bisection where `bad` records fail any range that holds them.
    fn isolate(n: usize, bad: &[usize]) -> (Vec<usize>, Vec<usize>, usize) {
        let mut b = Bisect::new(n);
        let (mut applied, mut rejected, mut attempts) = (Vec::new(), Vec::new(), 0);
        while let Some(r) = b.next_range() {
            attempts += 1;
            if r.clone().any(|i| bad.contains(&i)) {
                rejected.extend(b.failed(r));
            } else {
                applied.extend(r);
            }
        }
        (applied, rejected, attempts)
    }

    #[test]
    fn bisection_finds_exactly_the_bad_records_in_order() {
        let (applied, rejected, attempts) = isolate(5000, &[1234]);
        assert_eq!(rejected, vec![1234]);
        assert_eq!(applied.len(), 4999);
        assert!(applied.windows(2).all(|w| w[0] < w[1]), "record order kept");
        assert!(attempts <= 2 * 13 + 1, "{attempts} attempts");
        let (applied, rejected, _) = isolate(7, &[0, 6]);
        assert_eq!((applied, rejected), (vec![1, 2, 3, 4, 5], vec![0, 6]));
        assert_eq!(isolate(0, &[]).2, 0);
    }

    #[test]
    fn a_retried_range_comes_back_whole_before_the_rest() {
        let mut b = Bisect::new(8);
        let first = b.next_range().unwrap();
        assert_eq!(first, 0..8);
        b.retry(first);
        assert_eq!(b.next_range(), Some(0..8), "tried again whole, not halved");
        assert_eq!(b.failed(0..8), None);
        assert_eq!(b.next_range(), Some(0..4));
    }

    #[test]
    fn sqlstates_are_classified_once() {
        use ErrorClass::*;
        for (code, want) in [
            (None, Transient),
            (Some("08006"), Transient),
            (Some("40001"), Transient),
            (Some("57P01"), Transient),
            (Some("53300"), Transient),
            (Some("22P05"), BadData),
            (Some("22021"), BadData),
            (Some("22008"), BadData),
            (Some("23505"), BadData),
            (Some("21000"), BadData),
            (Some("42702"), BadData),
            (Some("42701"), BadData),
            (Some("54011"), BadData),
            (Some("54000"), BadData),
            (Some("28P01"), Fatal),
            (Some("42501"), Fatal),
            (Some("3D000"), Fatal),
        ] {
            assert_eq!(classify_sqlstate(code), want, "{code:?}");
        }
    }
}
