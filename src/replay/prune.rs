//! `cdc-lake prune-raw --before <time>`: raw-log retention that never loses a change.
//!
//! A raw row is deleted only when the lake manifest proves the lake holds it: its offset lies in
//! the contiguous run of committed manifest entries of its partition, and every file those
//! entries list exists with the recorded size. Afterwards `cdc-replay --source lake` can still
//! rebuild everything.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use object_store::path::Path;

use crate::config::Config;
use crate::domain::TopicPartition;
use crate::sink::lake::manifest::Layout;
use crate::sink::lake::read_commits;

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

/// The offsets `[first, next)` a partition's manifest proves are in the lake, after checking
/// that each listed file exists with its recorded size.
async fn proven_range(
    store: &dyn object_store::ObjectStore,
    layout: &Layout,
    tp: &TopicPartition,
) -> anyhow::Result<Option<(i64, i64)>> {
    let commits = read_commits(store, layout, tp)
        .await
        .with_context(|| format!("reading the lake manifest of {tp}"))?;
    let Some(first) = commits.first() else {
        return Ok(None);
    };
    let (start, mut next) = (first.first_offset, first.first_offset);
    for c in &commits {
        if c.first_offset != next {
            // A gap: only the run before it is proven.
            break;
        }
        for f in &c.files {
            let meta = store
                .head(&Path::from(f.path.as_str()))
                .await
                .with_context(|| {
                    format!("{tp}: manifest lists {} but it is not in the lake", f.path)
                })?;
            if meta.size != f.bytes {
                bail!(
                    "{tp}: lake file {} has {} bytes, the manifest says {}; not pruning",
                    f.path,
                    meta.size,
                    f.bytes
                );
            }
        }
        next = c.next_offset;
    }
    Ok(Some((start, next)))
}

/// Deletes raw rows older than `before` that the lake provably holds (`dry_run`: counts them).
pub async fn prune_raw(
    config: &Config,
    before: DateTime<Utc>,
    dry_run: bool,
) -> anyhow::Result<PruneReport> {
    if !config.lake.enabled {
        bail!("prune-raw needs the lake: without [lake] enabled nothing proves a raw row is kept elsewhere");
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
        let Some((first, next)) = proven_range(&*store, &layout, &tp).await? else {
            report.unproven.push(tp);
            continue;
        };
        let tx = client.transaction().await?;
        let sql = if dry_run {
            "SELECT count(*) FROM cdc_raw.cdc_events
              WHERE kafka_topic = $1 AND kafka_partition = $2
                AND kafka_offset >= $3 AND kafka_offset < $4
                AND coalesce(event_timestamp, ingested_at) < $5"
        } else {
            "WITH gone AS (DELETE FROM cdc_raw.cdc_events
              WHERE kafka_topic = $1 AND kafka_partition = $2
                AND kafka_offset >= $3 AND kafka_offset < $4
                AND coalesce(event_timestamp, ingested_at) < $5 RETURNING 1)
             SELECT count(*) FROM gone"
        };
        let n: i64 = tx
            .query_one(sql, &[&tp.topic, &tp.partition, &first, &next, &before])
            .await
            .with_context(|| format!("pruning {tp}"))?
            .get(0);
        tx.commit().await?;
        report.partitions.insert(tp, ((first, next), n as u64));
    }
    Ok(report)
}
