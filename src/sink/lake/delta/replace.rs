//! The Delta side of a compaction: one commit per table swaps the replaced files for the
//! compacted ones (`remove` + `add`, neither changing data), so a reader of any version sees
//! every offset exactly once.

use std::collections::HashMap;

use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake_core::kernel::{Action, Remove, Transaction};
use deltalake_core::protocol::DeltaOperation;

use super::stats::{DeltaFile, DATE_COLUMN};
use super::{checkpoint, DeltaLog, MAX_ATTEMPTS};
use crate::domain::TopicPartition;
use crate::sink::lake::manifest::FileEntry;
use crate::sink::SinkError;

/// The Delta app id of a topic-partition's compactions; its txn version is the sequence of the
/// partition's last compaction the table has, which makes finishing a compaction idempotent.
pub fn compaction_app_id(tp: &TopicPartition) -> String {
    format!("cdc-lake-compaction/{}/{}", tp.topic, tp.partition)
}

/// A file a compaction replaces, by its path below the table root (`date=…/<name>`).
pub struct Replaced<'a> {
    pub relative: String,
    pub entry: &'a FileEntry,
}

impl DeltaLog {
    /// The sequence of `tp`'s last compaction the table has recorded.
    pub async fn compaction_recorded(
        &mut self,
        table_dir: &str,
        tp: &TopicPartition,
    ) -> Result<Option<u64>, SinkError> {
        Ok(self
            .recorded_app(table_dir, compaction_app_id(tp))
            .await?
            .map(|v| v as u64))
    }

    /// Records compaction `sequence` of `tp` in one table: `remove` for each replaced file,
    /// `add` for each compacted one, and the compaction txn. Returns false when the table
    /// already has it (a finished compaction, or a table without a Delta log).
    pub async fn replace(
        &mut self,
        table_dir: &str,
        tp: &TopicPartition,
        sequence: u64,
        replaced: &[Replaced<'_>],
        added: &[DeltaFile],
        target_size: u64,
    ) -> Result<bool, SinkError> {
        if !Self::covers(table_dir) {
            return Ok(false);
        }
        let app = compaction_app_id(tp);
        let version = i64::try_from(sequence).expect("sequences stay far below i64::MAX");
        let checkpoint_interval = self.cfg.checkpoint_interval;
        for attempt in 1..=MAX_ATTEMPTS {
            if self
                .recorded_app(table_dir, app.clone())
                .await?
                .is_some_and(|v| v >= version)
            {
                return Ok(false);
            }
            let table = self.tables.get_mut(table_dir).expect("loaded above");
            let Some(snapshot) = table.delta.state.as_ref() else {
                return Err(SinkError::Manifest {
                    path: table_dir.to_string(),
                    reason: "a compaction of files this table's Delta log never recorded".into(),
                });
            };
            let now = chrono::Utc::now().timestamp_millis();
            let mut actions: Vec<Action> = replaced
                .iter()
                .map(|r| {
                    Action::Remove(Remove {
                        // As `add` wrote it: a Delta path is a URI.
                        path: r.relative.replace('%', "%25"),
                        data_change: false,
                        deletion_timestamp: Some(now),
                        extended_file_metadata: Some(true),
                        partition_values: Some(HashMap::from([(
                            DATE_COLUMN.to_string(),
                            Some(r.entry.date.clone()),
                        )])),
                        size: Some(r.entry.bytes as i64),
                        tags: None,
                        deletion_vector: None,
                        base_row_id: None,
                        default_row_commit_version: None,
                    })
                })
                .collect();
            actions.extend(added.iter().map(|f| {
                let mut add = f.add.clone();
                add.data_change = false;
                Action::Add(add)
            }));
            actions.push(Action::Txn(Transaction {
                app_id: app.clone(),
                version,
                last_updated: Some(now),
            }));
            let operation = DeltaOperation::Optimize {
                predicate: None,
                target_size: target_size as i64,
            };
            let properties = CommitProperties::default()
                .with_create_checkpoint(false)
                .with_cleanup_expired_logs(Some(false));
            let result = CommitBuilder::from(properties)
                .with_actions(actions)
                .with_max_retries(MAX_ATTEMPTS)
                .build(Some(snapshot as _), table.delta.log_store(), operation)
                .await;
            match result {
                Ok(done) => {
                    table.delta.state = Some(done.snapshot);
                    if (done.version + 1) % checkpoint_interval as i64 == 0 {
                        checkpoint(&table.delta, table_dir).await;
                    }
                    tracing::debug!(%tp, table = table_dir, version = done.version, sequence, "Delta compaction commit");
                    return Ok(true);
                }
                Err(e) => {
                    let what = format!("Delta compaction of {tp}");
                    self.after_failed_commit(table_dir, attempt, e, &what)
                        .await?
                }
            }
        }
        unreachable!("the last attempt returns")
    }
}
