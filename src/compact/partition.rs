//! One partition's compaction: finish the last one, vacuum, plan, merge, upload, record, and
//! swap the files in each table's Delta log.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use super::merge::{Added, Merger};
use super::plan::{plan_runs, Run};
use super::{crash_point, CompactError, Options, PartitionReport};
use crate::domain::TopicPartition;
use crate::sink::lake::compaction::{
    list_compactions, read_partition, Compaction, CompactionPending, Replacement,
};
use crate::sink::lake::delta::stats::DeltaFile;
use crate::sink::lake::delta::{DeltaLog, Replaced};
use crate::sink::lake::manifest::{stored_path, FileEntry, Layout};
use crate::sink::lake::{read_bytes, store_err};

pub struct Compactor {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) layout: Layout,
    pub(super) delta: Option<DeltaLog>,
    pub(super) options: Options,
}

/// A compacted file, uploaded: its entry, the entries it replaces, and its Delta `add`.
struct Written {
    table_dir: String,
    replacement: Replacement,
    delta: Option<DeltaFile>,
}

pub(super) fn corrupt(tp: &TopicPartition) -> impl FnOnce(String) -> CompactError + '_ {
    move |reason| CompactError::Corrupt {
        tp: tp.clone(),
        reason,
    }
}

fn create() -> PutOptions {
    PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    }
}

impl Compactor {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        layout: Layout,
        delta: Option<DeltaLog>,
        options: Options,
    ) -> Self {
        Self {
            store,
            layout,
            delta,
            options,
        }
    }

    pub async fn partition(
        &mut self,
        tp: &TopicPartition,
    ) -> Result<PartitionReport, CompactError> {
        let mut report = PartitionReport {
            tp: Some(tp.clone()),
            ..Default::default()
        };
        let objects = list_compactions(&*self.store, &self.layout, tp).await?;
        if !self.options.dry_run {
            report.undone_uploads = self.undo_pending(tp, &objects).await?;
        }
        let partition = read_partition(&*self.store, &self.layout, tp).await?;
        if !self.options.dry_run {
            report.finished_delta_commits = self
                .finish_delta(tp, &partition.compactions, &objects.vacuumed)
                .await?;
            report.vacuumed = self
                .vacuum(tp, &partition.compactions, &objects.vacuumed)
                .await?;
        }
        report.files_before = partition.files.len();
        report.files_after = partition.files.len();
        let published = self.published(tp, &partition.files).await?;
        let runs = plan_runs(
            &partition.files,
            &self.layout,
            &self.options.eligibility,
            |dir, f| match published.get(dir) {
                Some(recorded) => recorded.is_some_and(|next| f.max_offset < next),
                None => true,
            },
        )
        .map_err(corrupt(tp))?;
        if runs.is_empty() {
            return Ok(report);
        }
        if self.options.dry_run {
            report.replaced = runs.iter().map(|r| r.files.len()).sum();
            report.written = runs.len();
            report.bytes_written = runs.iter().flat_map(|r| &r.files).map(|f| f.bytes).sum();
        } else {
            let sequence = objects
                .records
                .iter()
                .chain(&objects.pending)
                .max()
                .map_or(1, |last| last + 1);
            self.execute(tp, sequence, runs, &mut report).await?;
        }
        report.files_after = report.files_before - report.replaced + report.written;
        Ok(report)
    }

    /// For each Delta table among `files`, the next offset of `tp` its log has recorded: only
    /// files below it may be replaced. Tables without a log (plain Parquet, escaped names)
    /// are not in the map.
    async fn published(
        &mut self,
        tp: &TopicPartition,
        files: &[FileEntry],
    ) -> Result<HashMap<String, Option<i64>>, CompactError> {
        let mut out = HashMap::new();
        let Some(delta) = self.delta.as_mut() else {
            return Ok(out);
        };
        for f in files {
            let Some((dir, _)) = self.layout.table_part(&f.path) else {
                continue;
            };
            if DeltaLog::covers(&dir) && !out.contains_key(&dir) {
                let recorded = delta.recorded(&dir, tp).await?;
                out.insert(dir, recorded);
            }
        }
        Ok(out)
    }

    async fn execute(
        &mut self,
        tp: &TopicPartition,
        sequence: u64,
        runs: Vec<Run>,
        report: &mut PartitionReport,
    ) -> Result<(), CompactError> {
        let pending_path = self.layout.compaction_pending(tp, sequence);
        let mut pending = CompactionPending {
            sequence,
            paths: Vec::new(),
        };
        let body =
            |p: &CompactionPending| PutPayload::from(serde_json::to_vec(p).expect("serialises"));
        match self.store.put_opts(&pending_path, body(&pending), create()).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(CompactError::Busy(format!(
                    "{pending_path} appeared while this compaction ran: another compactor is at work"
                )))
            }
            Err(e) => return Err(store_err(&pending_path)(e).into()),
        }
        let mut written = Vec::new();
        for run in &runs {
            let mut merger: Option<Merger> = None;
            for f in &run.files {
                let bytes = read_bytes(&*self.store, &stored_path(&f.path)).await?;
                match merger.as_mut() {
                    None => merger = Some(Merger::start(f, bytes).map_err(corrupt(tp))?),
                    Some(m) => {
                        if let Added::Split(next) = m.add(f, bytes).map_err(corrupt(tp))? {
                            let done = std::mem::replace(m, *next);
                            written.extend(self.upload(tp, run, done, &mut pending, body).await?);
                        }
                    }
                }
            }
            if let Some(m) = merger {
                written.extend(self.upload(tp, run, m, &mut pending, body).await?);
            }
        }
        if written.is_empty() {
            // Every run split into single files (schema changes): nothing to record.
            self.store
                .delete(&pending_path)
                .await
                .map_err(store_err(&pending_path))?;
            return Ok(());
        }
        let record = Compaction {
            topic: tp.topic.clone(),
            partition: tp.partition,
            sequence,
            replacements: written.iter().map(|w| w.replacement.clone()).collect(),
            committed_at: chrono::Utc::now().to_rfc3339(),
        };
        let record_path = self.layout.compaction(tp, sequence);
        let record_body = PutPayload::from(serde_json::to_vec_pretty(&record).expect("serialises"));
        match self.store.put_opts(&record_path, record_body, create()).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(CompactError::Busy(format!(
                    "{record_path} was written by another compactor meanwhile; run again once it is done"
                )))
            }
            Err(e) => return Err(store_err(&record_path)(e).into()),
        }
        crash_point("compact:recorded");
        self.store
            .delete(&pending_path)
            .await
            .map_err(store_err(&pending_path))?;
        report.written = written.len();
        report.replaced = written.iter().map(|w| w.replacement.replaces.len()).sum();
        report.bytes_written = written.iter().map(|w| w.replacement.file.bytes).sum();

        let mut by_table: BTreeMap<&str, Vec<&Written>> = BTreeMap::new();
        for w in &written {
            by_table.entry(&w.table_dir).or_default().push(w);
        }
        for (table_dir, files) in by_table {
            let added: Vec<DeltaFile> = files.iter().filter_map(|w| w.delta.clone()).collect();
            if added.is_empty() {
                continue;
            }
            let replaced = self.replaced(files.iter().map(|w| &w.replacement));
            let delta = self
                .delta
                .as_mut()
                .expect("Delta files only with Delta logs");
            let target = self.options.eligibility.target_size;
            delta
                .replace(table_dir, tp, sequence, &replaced, &added, target)
                .await?;
            crash_point("compact:delta");
        }
        Ok(())
    }

    /// The Delta form of the files some replacements replace.
    pub(super) fn replaced<'a>(
        &self,
        replacements: impl Iterator<Item = &'a Replacement>,
    ) -> Vec<Replaced<'a>> {
        replacements
            .flat_map(|r| &r.replaces)
            .filter_map(|entry| {
                let (_, relative) = self.layout.table_part(&entry.path)?;
                Some(Replaced { relative, entry })
            })
            .collect()
    }

    /// Uploads a finished merge of two files or more (a single file stays as it is), after
    /// naming it in the pending object.
    async fn upload(
        &self,
        tp: &TopicPartition,
        run: &Run,
        merger: Merger,
        pending: &mut CompactionPending,
        body: impl Fn(&CompactionPending) -> PutPayload,
    ) -> Result<Option<Written>, CompactError> {
        if merger.files() < 2 {
            return Ok(None);
        }
        let merged = merger.finish().map_err(corrupt(tp))?;
        let (first, last) = (&merged.inputs[0], &merged.inputs[merged.inputs.len() - 1]);
        let path = self.layout.compacted_file(
            &run.table_dir,
            &run.date,
            tp,
            (first.min_offset, last.max_offset),
        );
        pending.paths.push(path.to_string());
        let pending_path = self.layout.compaction_pending(tp, pending.sequence);
        self.store
            .put(&pending_path, body(pending))
            .await
            .map_err(store_err(&pending_path))?;
        let bytes = Bytes::from(merged.bytes);
        let delta = match self.delta.is_some() && DeltaLog::covers(&run.table_dir) {
            true => {
                let (_, relative) = self.layout.table_part(path.as_ref()).expect("a data file");
                Some(DeltaFile::from_parquet(&relative, &run.date, &bytes).map_err(corrupt(tp))?)
            }
            false => None,
        };
        let file = FileEntry {
            path: path.to_string(),
            table: first.table.clone(),
            date: run.date.clone(),
            rows: merged.rows,
            bytes: bytes.len() as u64,
            min_offset: first.min_offset,
            max_offset: last.max_offset,
        };
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(store_err(&path))?;
        crash_point("compact:uploaded");
        tracing::debug!(%tp, path = %path, files = merged.inputs.len(), rows = merged.rows, "compacted file uploaded");
        Ok(Some(Written {
            table_dir: run.table_dir.clone(),
            replacement: Replacement {
                file,
                replaces: merged.inputs,
            },
            delta,
        }))
    }
}
