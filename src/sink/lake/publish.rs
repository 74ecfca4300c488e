//! The lake's Delta side: the Delta commits of the manifest commits a write or flush made
//! (queued per partition in manifest order, published together, one commit per table), and
//! the republish of what a table's log lacks when a partition is assigned.

use std::collections::{HashMap, VecDeque};

use super::delta::stats::DeltaFile;
use super::delta::{DeltaLog, TableFile};
use super::manifest::{self, Commit, FileEntry};
use super::store::read_bytes;
use super::LakeSink;
use crate::domain::TopicPartition;
use crate::sink::SinkError;

/// The Delta side of one manifest commit: its files, per table directory and source table.
pub(super) struct Unpublished {
    pub(super) next_offset: i64,
    pub(super) files: Vec<TableFile>,
}

impl LakeSink {
    /// Delta commits for the manifest commits of `tp` that a table has not recorded: a crash
    /// came between the two, or the lake had no Delta logs yet. Commits are checked newest
    /// first and the scan stops at one every table has; Delta commits land in offset order,
    /// so the older ones are recorded too.
    pub(super) async fn republish(
        &mut self,
        tp: &TopicPartition,
        commits: &[Commit],
    ) -> Result<(), SinkError> {
        let Some(delta) = self.delta.as_mut() else {
            return Ok(());
        };
        delta.forget(tp);
        let mut recorded: HashMap<String, Option<i64>> = HashMap::new();
        let mut missing: Vec<(&Commit, Vec<&FileEntry>)> = Vec::new();
        for c in commits.iter().rev() {
            let mut files = Vec::new();
            // A commit with no file of a Delta table (only skips, or only escaped-name tables)
            // says nothing about what the logs hold: the scan goes on past it.
            let mut covered = 0;
            for f in &c.files {
                let (dir, _) =
                    self.layout
                        .table_part(&f.path)
                        .ok_or_else(|| SinkError::Manifest {
                            path: f.path.clone(),
                            reason: "a file outside cdc_events/<table>/date=<date>/".into(),
                        })?;
                if !DeltaLog::covers(&dir) {
                    continue;
                }
                covered += 1;
                let r = match recorded.get(&dir) {
                    Some(r) => *r,
                    None => {
                        let r = delta.recorded(&dir, tp).await?;
                        recorded.insert(dir, r);
                        r
                    }
                };
                if r.is_none_or(|v| v < c.next_offset) {
                    files.push(f);
                }
            }
            if covered == 0 {
                continue;
            }
            if files.is_empty() {
                break;
            }
            missing.push((c, files));
        }
        for (c, entries) in missing.into_iter().rev() {
            let mut files = Vec::with_capacity(entries.len());
            for f in entries {
                let path = manifest::stored_path(&f.path);
                let bytes = read_bytes(&*self.store, &path).await?;
                let (dir, relative) = self.layout.table_part(&f.path).expect("checked above");
                let file =
                    DeltaFile::from_parquet(&relative, &f.date, &bytes).map_err(|reason| {
                        SinkError::Manifest {
                            path: f.path.clone(),
                            reason,
                        }
                    })?;
                files.push((dir, f.table.clone(), file));
            }
            tracing::info!(%tp, next_offset = c.next_offset, files = files.len(), "republishing a lake commit to Delta");
            let delta = self.delta.as_mut().expect("checked above");
            delta.publish(tp, c.next_offset, files).await?;
        }
        Ok(())
    }

    /// Lands the Delta commits of every partition's manifest commits that have none yet: one
    /// Delta commit per table for all of them, so a flush that rolls many partitions writes
    /// each table's log once. On failure every partition keeps its queue, oldest first, and
    /// the next write or flush tries again; a table that took its commit before the failure
    /// skips those partitions then (their txn versions).
    pub(super) async fn publish_backlogs(&mut self) -> Result<(), SinkError> {
        if self.delta.is_none() {
            return Ok(());
        }
        let queued: Vec<(TopicPartition, VecDeque<Unpublished>)> = self
            .partitions
            .iter_mut()
            .filter(|(_, st)| !st.unpublished.is_empty())
            .map(|(tp, st)| (tp.clone(), std::mem::take(&mut st.unpublished)))
            .collect();
        if queued.is_empty() {
            return Ok(());
        }
        let commits = queued
            .iter()
            .flat_map(|(tp, q)| {
                q.iter()
                    .map(|u| (tp.clone(), u.next_offset, u.files.clone()))
            })
            .collect();
        let delta = self.delta.as_mut().expect("checked above");
        if let Err(e) = delta.publish_many(commits).await {
            for (tp, mut q) in queued {
                if let Some(st) = self.partitions.get_mut(&tp) {
                    q.extend(std::mem::take(&mut st.unpublished));
                    st.unpublished = q;
                }
            }
            return Err(e);
        }
        Ok(())
    }
}
