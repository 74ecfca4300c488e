//! What a compaction that died left behind, and the deletion of replaced files.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::partition::{corrupt, Compactor};
use super::{crash_point, CompactError};
use crate::domain::TopicPartition;
use crate::sink::lake::compaction::{Compaction, CompactionObjects, CompactionPending};
use crate::sink::lake::delta::stats::DeltaFile;
use crate::sink::lake::delta::DeltaLog;
use crate::sink::lake::manifest::stored_path;
use crate::sink::lake::{read_bytes, read_json, store_err};

async fn delete_if_present(
    store: &dyn object_store::ObjectStore,
    path: &object_store::path::Path,
) -> Result<bool, CompactError> {
    match store.delete(path).await {
        Ok(()) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(store_err(path)(e).into()),
    }
}

impl Compactor {
    /// Deletes the uploads of compactions whose record never landed, then their pending
    /// objects: the lake is as it was before they started. Returns the uploads deleted.
    pub(super) async fn undo_pending(
        &self,
        tp: &TopicPartition,
        objects: &CompactionObjects,
    ) -> Result<usize, CompactError> {
        let mut undone = 0;
        for &sequence in &objects.pending {
            let pending_path = self.layout.compaction_pending(tp, sequence);
            if !objects.records.contains(&sequence) {
                let pending: CompactionPending = read_json(&*self.store, &pending_path).await?;
                for p in &pending.paths {
                    if delete_if_present(&*self.store, &stored_path(p)).await? {
                        undone += 1;
                    }
                }
                tracing::info!(%tp, sequence, objects = pending.paths.len(), "removed the uploads of a compaction that never committed");
            }
            delete_if_present(&*self.store, &pending_path).await?;
        }
        Ok(undone)
    }

    /// Lands the Delta commits of recorded compactions that a table lacks (the compaction died
    /// between its record and its Delta commits), in sequence order. Vacuumed compactions
    /// finished long ago. Returns the commits landed.
    pub(super) async fn finish_delta(
        &mut self,
        tp: &TopicPartition,
        compactions: &[Compaction],
        vacuumed: &[u64],
    ) -> Result<usize, CompactError> {
        let mut finished = 0;
        if self.delta.is_none() {
            return Ok(0);
        }
        for c in compactions
            .iter()
            .filter(|c| !vacuumed.contains(&c.sequence))
        {
            let mut by_table: BTreeMap<String, Vec<&crate::sink::lake::compaction::Replacement>> =
                BTreeMap::new();
            for r in &c.replacements {
                let (dir, _) = self.layout.table_part(&r.file.path).ok_or_else(|| {
                    corrupt(tp)(format!("{} is outside cdc_events/", r.file.path))
                })?;
                if DeltaLog::covers(&dir) {
                    by_table.entry(dir).or_default().push(r);
                }
            }
            for (dir, replacements) in by_table {
                let delta = self.delta.as_mut().expect("checked above");
                if delta
                    .compaction_recorded(&dir, tp)
                    .await?
                    .is_some_and(|s| s >= c.sequence)
                {
                    continue;
                }
                let mut added = Vec::new();
                for r in &replacements {
                    let bytes: Bytes = read_bytes(&*self.store, &stored_path(&r.file.path)).await?;
                    let (_, relative) =
                        self.layout.table_part(&r.file.path).expect("checked above");
                    added.push(
                        DeltaFile::from_parquet(&relative, &r.file.date, &bytes)
                            .map_err(corrupt(tp))?,
                    );
                }
                let replaced = self.replaced(replacements.iter().copied());
                let target = self.options.eligibility.target_size;
                let delta = self.delta.as_mut().expect("checked above");
                if delta
                    .replace(&dir, tp, c.sequence, &replaced, &added, target)
                    .await?
                {
                    tracing::info!(%tp, table = dir, sequence = c.sequence, "finished the Delta commit of a compaction that died");
                    finished += 1;
                }
            }
        }
        Ok(finished)
    }

    /// Deletes the files of compactions older than the retention, then marks each one
    /// vacuumed. Returns the files deleted.
    pub(super) async fn vacuum(
        &self,
        tp: &TopicPartition,
        compactions: &[Compaction],
        vacuumed: &[u64],
    ) -> Result<usize, CompactError> {
        let now = chrono::Utc::now();
        let mut deleted = 0;
        for c in compactions
            .iter()
            .filter(|c| !vacuumed.contains(&c.sequence))
        {
            let at = chrono::DateTime::parse_from_rfc3339(&c.committed_at).map_err(|e| {
                corrupt(tp)(format!(
                    "compaction {} has no valid committed_at: {e}",
                    c.sequence
                ))
            })?;
            let age = now.signed_duration_since(at).to_std().unwrap_or_default();
            if age < self.options.retention {
                continue;
            }
            for old in c.replacements.iter().flat_map(|r| &r.replaces) {
                if delete_if_present(&*self.store, &stored_path(&old.path)).await? {
                    deleted += 1;
                    crash_point("compact:vacuum");
                }
            }
            let marker = self.layout.compaction_vacuumed(tp, c.sequence);
            self.store
                .put(&marker, object_store::PutPayload::from_static(b"{}"))
                .await
                .map_err(store_err(&marker))?;
        }
        Ok(deleted)
    }
}
