//! Where a replay reads changes from: the raw log in PostgreSQL ([`raw`]), or the lake's
//! Parquet files ([`lake`]).
//!
//! Both readers yield changes partition by partition in offset order, which keeps every key's
//! changes in order (a key lives in one partition). The raw log stores values already converted
//! for PostgreSQL plus each declared row schema; the lake stores the envelope as received, which
//! is decoded again with the live decoder.

mod lake;
mod raw;

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::mpsc;

use super::error::{ReplayError, ReplayResult};
use super::Selection;
use crate::domain::{TableId, TopicPartition};
use crate::envelope::Decoded;

pub use lake::{lake_commits, lake_partitions, plan_lake, read_lake, LAKE_CHUNK};
pub use raw::{plan_raw, read_raw};

/// What a selection covers, known before anything is written.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// Per partition: (first, last) offset of the selected changes.
    pub partitions: BTreeMap<TopicPartition, (i64, i64)>,
    /// Source tables (`schema.table`) with selected changes.
    pub tables: BTreeSet<TableId>,
    /// Number of selected changes (before the `--until` filter for the lake, which needs
    /// the envelopes).
    pub events: u64,
}

/// Chunks of changes in replay order; the reader stops when the receiver is dropped.
pub type Chunks = mpsc::Receiver<ReplayResult<Vec<Decoded>>>;

/// Runs a reader task. A reader that panics ends its stream with an error: a closed channel
/// alone reads as "nothing more to replay", which would turn a crash into a silent short replay.
fn spawn_reader<F>(tx: mpsc::Sender<ReplayResult<Vec<Decoded>>>, reader: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let task = tokio::spawn(reader);
    tokio::spawn(async move {
        if let Err(e) = task.await {
            let reason = match e.try_into_panic() {
                Ok(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into()),
                Err(e) => e.to_string(),
            };
            let _ = tx
                .send(Err(ReplayError::Corrupt(format!(
                    "the replay reader stopped: {reason}"
                ))))
                .await;
        }
    });
}

/// `schema.table` as stored in the raw log and the manifest.
fn table_id(s: &str) -> TableId {
    match s.split_once('.') {
        Some((schema, table)) => TableId::new(schema, table),
        None => TableId::new("", s),
    }
}

/// Fails when the selection is empty, naming what it looked for.
pub fn ensure_not_empty(plan: &Plan, sel: &Selection, source: &str) -> ReplayResult<()> {
    if plan.events == 0 {
        return Err(ReplayError::Refused(format!(
            "nothing to replay: no change in the {source} matches {sel}"
        )));
    }
    Ok(())
}
