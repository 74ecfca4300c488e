//! `cdc-lake prune-raw --before <time>`: raw-log retention that never loses a change.
//!
//! A raw row is deleted only when the lake manifest proves the lake holds it: its offset lies in
//! the contiguous run of committed manifest entries of its partition, a committed file of its
//! own table covers that offset, and every file those entries list exists with the recorded
//! size. A manifest range alone proves nothing: it also covers records the lake did not store
//! as rows (rejects, skips). Afterwards `cdc-replay --source lake` can still rebuild everything.

use std::collections::BTreeMap;

use super::error::{Context, ReplayError, ReplayResult};
use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::domain::TopicPartition;
use crate::sink::lake::compaction::read_partition;
use crate::sink::lake::manifest::{FileEntry, Layout};

/// What prune-raw deleted (or would delete) per partition.
#[derive(Debug, Default)]
pub struct PruneReport {
    /// Per partition: (offsets proven in the lake [first, next), rows deleted).
    pub partitions: BTreeMap<TopicPartition, ((i64, i64), u64)>,
    /// Partitions in the raw log without lake coverage: nothing deleted there.
    pub unproven: Vec<TopicPartition>,
}

impl PruneReport {
    pub fn deleted(&self) -> u64 {
        self.partitions.values().map(|(_, n)| n).sum()
    }
}

/// What a partition's manifest proves is in the lake: the offsets `[first, next)` of its
/// contiguous run of commits, and the files of those commits (each checked to exist with its
/// recorded size), which say which table's rows each offset range holds.
struct Proof {
    range: (i64, i64),
    files: Vec<FileEntry>,
}

async fn proven_range(
    store: &dyn object_store::ObjectStore,
    layout: &Layout,
    tp: &TopicPartition,
) -> ReplayResult<Option<Proof>> {
    let partition = read_partition(store, layout, tp)
        .await
        .with_context(|| format!("reading the lake manifest of {tp}"))?;
    let Some(first) = partition.commits.first() else {
        return Ok(None);
    };
    let (start, mut next) = (first.first_offset, first.first_offset);
    for c in &partition.commits {
        if c.first_offset != next {
            // A gap: only the run before it is proven.
            break;
        }
        next = c.next_offset;
    }
    // The files that hold the run's rows now (compactions applied): a compacted file lies
    // inside the commits it replaced files of.
    let files: Vec<FileEntry> = partition
        .files
        .into_iter()
        .filter(|f| f.min_offset >= start && f.max_offset < next)
        .collect();
    for f in &files {
        let meta = store
            .head(&crate::sink::lake::manifest::stored_path(&f.path))
            .await
            .with_context(|| {
                format!("{tp}: manifest lists {} but it is not in the lake", f.path)
            })?;
        if meta.size != f.bytes {
            return Err(ReplayError::Corrupt(format!(
                "{tp}: lake file {} has {} bytes, the manifest says {}; not pruning",
                f.path, meta.size, f.bytes
            )));
        }
    }
    Ok(Some(Proof {
        range: (start, next),
        files,
    }))
}

/// Deletes raw rows older than `before` that the lake provably holds (`dry_run`: counts them).
pub async fn prune_raw(
    config: &Config,
    before: DateTime<Utc>,
    dry_run: bool,
) -> ReplayResult<PruneReport> {
    if !config.lake.enabled {
        return Err(ReplayError::Refused("prune-raw needs the lake: without [lake] enabled nothing proves a raw row is kept elsewhere".into()));
    }
    let (store, _) = crate::sink::lake::open_store(&config.lake)?;
    let layout = Layout::new(&config.lake.prefix);
    let mut client = crate::db::connect(&config.postgres, "cdc-lake prune-raw").await?;
    let partitions: Vec<TopicPartition> = client
        .query(
            "SELECT DISTINCT kafka_topic, kafka_partition FROM cdc_lake.checkpoints WHERE sink = 'raw' ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| TopicPartition::new(r.get::<_, String>(0), r.get(1)))
        .collect();
    let mut report = PruneReport::default();
    for tp in partitions {
        let Some(proof) = proven_range(&*store, &layout, &tp).await? else {
            report.unproven.push(tp);
            continue;
        };
        let (first, next) = proof.range;
        let tables: Vec<&str> = proof.files.iter().map(|f| f.table.as_str()).collect();
        let lows: Vec<i64> = proof.files.iter().map(|f| f.min_offset).collect();
        let highs: Vec<i64> = proof.files.iter().map(|f| f.max_offset).collect();
        // A row is proven when a committed file of its own table covers its offset: within one
        // commit the lake writes every change of a table (and date) into that table's file.
        let proven = "kafka_topic = $1 AND kafka_partition = $2
                AND kafka_offset >= $3 AND kafka_offset < $4
                AND coalesce(event_timestamp, ingested_at) < $5
                AND EXISTS (SELECT 1 FROM unnest($6::text[], $7::bigint[], $8::bigint[]) AS f(t, lo, hi)
                             WHERE f.t = e.source_table AND e.kafka_offset BETWEEN f.lo AND f.hi)";
        let sql = if dry_run {
            format!("SELECT count(*) FROM cdc_raw.cdc_events e WHERE {proven}")
        } else {
            format!(
                "WITH gone AS (DELETE FROM cdc_raw.cdc_events e WHERE {proven} RETURNING 1)
                 SELECT count(*) FROM gone"
            )
        };
        let tx = client.transaction().await?;
        let n: i64 = tx
            .query_one(
                &sql,
                &[
                    &tp.topic,
                    &tp.partition,
                    &first,
                    &next,
                    &before,
                    &tables,
                    &lows,
                    &highs,
                ],
            )
            .await
            .with_context(|| format!("pruning {tp}"))?
            .get(0);
        tx.commit().await?;
        report.partitions.insert(tp, ((first, next), n as u64));
    }
    Ok(report)
}
