//! Delta commits of the lake's manifest commits: the files of any number of partitions, one
//! commit per table, each partition with its `txn`.

use arrow::datatypes::{DataType as ArrowType, Field, Schema as ArrowSchema};
use deltalake_core::kernel::engine::arrow_conversion::{TryFromArrow, TryFromKernel};
use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake_core::kernel::{
    contains_timestampntz, new_metadata, Action, MetadataExt, Protocol, StructType, Transaction,
};
use deltalake_core::protocol::{DeltaOperation, SaveMode};
use deltalake_core::{DeltaTable, DeltaTableError};
use std::collections::BTreeMap;

use super::stats::{DeltaFile, DATE_COLUMN};
use super::{app_id, checkpoint, delta_err, types, DeltaLog, MAX_ATTEMPTS, SNAPSHOT_STATS_BUDGET};
use crate::domain::TopicPartition;
use crate::sink::SinkError;

/// A file of a manifest commit as its table's Delta commit takes it: (table directory as the
/// layout names it, source table, file).
pub type TableFile = (String, String, DeltaFile);

/// One manifest commit: its topic-partition, the next offset after it, and its files.
pub type ManifestCommit = (TopicPartition, i64, Vec<TableFile>);

impl DeltaLog {
    /// Records one manifest commit of `tp` (offsets up to `next_offset`): for every table, its
    /// files, in one Delta commit, unless the table already recorded the range.
    pub async fn publish(
        &mut self,
        tp: &TopicPartition,
        next_offset: i64,
        files: Vec<TableFile>,
    ) -> Result<(), SinkError> {
        self.publish_many(vec![(tp.clone(), next_offset, files)])
            .await
    }

    /// The Delta side of any number of manifest commits (topic-partition, its next offset after
    /// the commit, and the commit's files as (table directory, source table, file)): one Delta
    /// commit per table, with the files of every partition and a `txn` per partition at the
    /// newest of its commits that touched the table. A partition whose files a table already
    /// has (its txn version is at or past that offset) is left out of that table's commit.
    pub async fn publish_many(&mut self, commits: Vec<ManifestCommit>) -> Result<(), SinkError> {
        let mut by_table: BTreeMap<String, (String, Vec<PartitionFiles>)> = BTreeMap::new();
        for (tp, next_offset, files) in commits {
            for (table_dir, table_name, file) in files {
                if !Self::covers(&table_dir) {
                    tracing::debug!(
                        table = table_dir,
                        "no Delta log for an escaped table directory"
                    );
                    continue;
                }
                let parts = &mut by_table
                    .entry(table_dir)
                    .or_insert_with(|| (table_name, Vec::new()))
                    .1;
                let part = match parts.iter_mut().position(|p| p.tp == tp) {
                    Some(i) => &mut parts[i],
                    None => {
                        parts.push(PartitionFiles {
                            tp: tp.clone(),
                            commits: Vec::new(),
                        });
                        parts.last_mut().expect("pushed")
                    }
                };
                match part.commits.last_mut() {
                    Some((next, files)) if *next == next_offset => files.push(file),
                    _ => part.commits.push((next_offset, vec![file])),
                }
            }
        }
        for (table_dir, (table_name, parts)) in by_table {
            self.publish_table(&table_dir, &table_name, &parts).await?;
        }
        Ok(())
    }

    async fn publish_table(
        &mut self,
        table_dir: &str,
        table_name: &str,
        parts: &[PartitionFiles],
    ) -> Result<(), SinkError> {
        let checkpoint_interval = self.cfg.checkpoint_interval;
        let retention = self.cfg.log_retention.0;
        for attempt in 1..=MAX_ATTEMPTS {
            // The commits the table lacks, by each partition's txn version.
            let mut files: Vec<&DeltaFile> = Vec::new();
            let mut txns: Vec<(String, i64)> = Vec::with_capacity(parts.len());
            for p in parts {
                let recorded = self.recorded(table_dir, &p.tp).await?;
                let lacking = p
                    .commits
                    .iter()
                    .filter(|(next, _)| recorded.is_none_or(|v| v < *next));
                let mut newest = None;
                for (next, commit_files) in lacking {
                    files.extend(commit_files);
                    newest = Some(*next);
                }
                match newest {
                    Some(next) => txns.push((app_id(&p.tp), next)),
                    None => {
                        tracing::debug!(tp = %p.tp, table = table_dir, ?recorded, "Delta already has these lake commits")
                    }
                }
            }
            if txns.is_empty() {
                return Ok(());
            }
            let table = self.tables.get_mut(table_dir).expect("loaded above");
            let (actions, operation) = commit_actions(
                &table.delta,
                table_name,
                &txns,
                &files,
                checkpoint_interval,
                retention,
            )
            .map_err(delta_err(table_dir))?;
            let properties = CommitProperties::default()
                .with_create_checkpoint(false)
                .with_cleanup_expired_logs(Some(false));
            let snapshot = table.delta.state.as_ref();
            let result = CommitBuilder::from(properties)
                .with_actions(actions)
                .with_max_retries(MAX_ATTEMPTS)
                .build(snapshot.map(|s| s as _), table.delta.log_store(), operation)
                .await;
            match result {
                Ok(done) => {
                    let version = done.version;
                    if table.delta.state.is_some() {
                        table.delta.state = Some(done.snapshot);
                    } else {
                        // Created: load it as every other table is held (without files).
                        self.tables.remove(table_dir);
                        self.table(table_dir).await?;
                    }
                    let table = self.tables.get_mut(table_dir).expect("loaded above");
                    let txns_len = txns.len();
                    for (app, next_offset) in txns {
                        table.known_apps.insert(app, Some(next_offset));
                    }
                    table.commits_since_load += 1;
                    let checkpointed = (version + 1) % checkpoint_interval as i64 == 0;
                    if checkpointed {
                        checkpoint(&table.delta, table_dir).await;
                    }
                    let columns = table
                        .delta
                        .state
                        .as_ref()
                        .map_or(0, |s| s.schema().fields().len());
                    if checkpointed || table.commits_since_load * columns >= SNAPSHOT_STATS_BUDGET {
                        self.reload(table_dir).await?;
                    }
                    tracing::debug!(
                        table = table_dir,
                        version,
                        partitions = txns_len,
                        files = files.len(),
                        "Delta commit"
                    );
                    return Ok(());
                }
                // Another writer changed what this commit read (the schema, or a partition's
                // txn after a rebalance): reload and decide again.
                Err(e) => {
                    self.after_failed_commit(table_dir, attempt, e, "Delta commit")
                        .await?
                }
            }
        }
        unreachable!("the last attempt returns")
    }
}

/// One partition's manifest commits that touched one table, oldest first: each commit's next
/// offset and its files of the table. A table that recorded some of them (a retry after a
/// failure, or a republish) gets only the rest; its txn version is the newest one's.
struct PartitionFiles {
    tp: TopicPartition,
    commits: Vec<(i64, Vec<DeltaFile>)>,
}

/// The actions and operation of one table commit: `add` per file, a `txn` per partition, and
/// `protocol` plus `metaData` when the table is new or the files bring columns it lacks.
fn commit_actions(
    table: &DeltaTable,
    table_name: &str,
    txns: &[(String, i64)],
    files: &[&DeltaFile],
    checkpoint_interval: u64,
    retention: std::time::Duration,
) -> Result<(Vec<Action>, DeltaOperation), DeltaTableError> {
    let current: Option<ArrowSchema> = match table.state.as_ref() {
        Some(state) => Some(ArrowSchema::try_from_kernel(state.schema().as_ref())?),
        None => None,
    };
    let mut merged = current.clone().unwrap_or_else(|| {
        // Text, not a Delta date: event dates outside years 1 to 9999 (timestamps beyond
        // PostgreSQL's range) are valid partition values then for every reader.
        ArrowSchema::new(vec![Field::new(DATE_COLUMN, ArrowType::Utf8, true)])
    });
    for f in files {
        merged = types::merge_schema(&merged, &f.schema, table_name);
    }
    let mut actions = Vec::new();
    let changed = current.as_ref() != Some(&merged);
    let schema = StructType::try_from_arrow(&merged)?;
    let needs_ntz = contains_timestampntz(schema.fields());
    let operation = match table.state.as_ref() {
        None => {
            let protocol = protocol(needs_ntz)?;
            let metadata = new_metadata(
                &schema,
                [DATE_COLUMN],
                [
                    (
                        "delta.checkpointInterval".to_string(),
                        checkpoint_interval.to_string(),
                    ),
                    (
                        "delta.logRetentionDuration".to_string(),
                        format!("interval {} seconds", retention.as_secs()),
                    ),
                ],
            )?
            .with_name(table_name.to_string())?;
            actions.push(Action::Protocol(protocol.clone()));
            actions.push(Action::Metadata(metadata.clone()));
            DeltaOperation::Create {
                mode: SaveMode::ErrorIfExists,
                location: table.table_url().clone(),
                protocol,
                metadata,
            }
        }
        Some(state) => {
            if changed {
                let has_ntz_feature = serde_json::to_value(state.protocol())?
                    .get("readerFeatures")
                    .and_then(|f| f.as_array())
                    .is_some_and(|f| f.iter().any(|f| f == "timestampNtz"));
                if needs_ntz && !has_ntz_feature {
                    actions.push(Action::Protocol(protocol(true)?));
                }
                actions.push(Action::Metadata(
                    state.metadata().clone().with_schema(&schema)?,
                ));
            }
            DeltaOperation::Write {
                mode: SaveMode::Append,
                partition_by: Some(vec![DATE_COLUMN.to_string()]),
                predicate: None,
            }
        }
    };
    actions.extend(files.iter().map(|f| Action::Add(f.add.clone())));
    let now = chrono::Utc::now().timestamp_millis();
    actions.extend(txns.iter().map(|(app, version)| {
        Action::Txn(Transaction {
            app_id: app.clone(),
            version: *version,
            last_updated: Some(now),
        })
    }));
    Ok((actions, operation))
}

/// Reader 1 / writer 2, or reader 3 / writer 7 with the `timestampNtz` feature when a column
/// is a timestamp without time zone (Debezium's `Timestamp`, `MicroTimestamp`).
fn protocol(timestamp_ntz: bool) -> Result<Protocol, DeltaTableError> {
    let value = if timestamp_ntz {
        serde_json::json!({"minReaderVersion": 3, "minWriterVersion": 7,
            "readerFeatures": ["timestampNtz"], "writerFeatures": ["timestampNtz"]})
    } else {
        serde_json::json!({"minReaderVersion": 1, "minWriterVersion": 2})
    };
    Ok(serde_json::from_value(value)?)
}
