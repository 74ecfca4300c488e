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
pub mod ident;
pub mod lake;
pub mod mapping;
pub mod memory;
pub mod raw;
pub mod state;

use std::collections::HashMap;
use std::future::Future;

use crate::batch::Batch;
use crate::domain::TopicPartition;

/// Next offset needed, per topic-partition.
pub type Offsets = HashMap<TopicPartition, i64>;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{sink}: PostgreSQL error while {context}: {}", pg_detail(source))]
    Postgres {
        sink: &'static str,
        context: String,
        #[source]
        source: tokio_postgres::Error,
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
}

impl SinkError {
    /// Whether retrying the same write can succeed (a dependency is down or busy), as opposed
    /// to a bug or bad data that will fail the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Postgres { source, .. } => match source.code() {
                // No SQLSTATE: the connection failed or closed.
                None => true,
                Some(code) => {
                    let c = code.code();
                    // 08 connection, 40 rollback (serialization/deadlock), 53 resources,
                    // 57 operator intervention (admin shutdown, terminated backend).
                    c.starts_with("08") || c.starts_with("40") || c.starts_with("53") || c.starts_with("57")
                        // 23505: a concurrent writer inserted the same key first; a retry
                        // sees its row and takes the update path.
                        || c == "23505"
                }
            },
            SinkError::ObjectStore { .. } => true,
            SinkError::Encode { .. }
            | SinkError::Value { .. }
            | SinkError::Manifest { .. }
            | SinkError::Mapping { .. }
            | SinkError::Fenced { .. } => false,
        }
    }

    /// True when the connection itself is gone and the sink must reconnect.
    pub fn needs_reconnect(&self) -> bool {
        matches!(self, SinkError::Postgres { source, .. } if source.is_closed() || source.code().is_none())
    }
}

/// tokio-postgres displays server errors as just "db error"; show the server's message and
/// SQLSTATE instead.
pub fn pg_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
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
}
