//! The lake: Hive-partitioned Parquet files in object storage (local directory or S3).
//!
//! Records are buffered per topic-partition, one file per (table, date), and committed together
//! when the partition's buffer rolls (rows, bytes or age) or a declared schema changes. A commit
//! uploads every file, then writes the manifest entry with a create-only put, then forgets
//! `_pending.json`. File names are deterministic (`<topic>+<partition>+<first offset>`), so a
//! retry after a crash rewrites the same objects instead of adding copies.

mod columns;
pub mod compaction;
pub mod delta;
pub mod encode;
mod file_builder;
pub mod manifest;
mod publish;
mod store;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use futures::future::try_join_all;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use self::delta::stats::DeltaFile;
use self::delta::DeltaLog;
use self::encode::FileFor;
use self::file_builder::FileBuilder;
use self::manifest::{date_of, day_of, Commit, FileEntry, Layout, Pending};
use self::publish::Unpublished;
use self::store::commit_paths;
pub use self::store::{
    lake_partitions, open_store, read_bytes, read_commits, read_json, store_err,
};
use super::{Ack, Offsets, Sink, SinkError, WriteStats};
use crate::batch::Batch;
use crate::config::{LakeConfig, TableFormat};
use crate::domain::{TableId, TopicPartition};
use crate::envelope::RowSchema;

pub const NAME: &str = "lake";

/// Records of one table and date waiting for the next commit, as the file's columns.
struct FileBuffer {
    file: FileBuilder,
    /// The declared (Connect) schema the file was opened with; a different one rolls the file.
    declared: Option<Arc<RowSchema>>,
}

#[derive(Default)]
struct PartitionState {
    /// Start of the next commit's offset range; None until the first record or commit.
    committed_next: Option<i64>,
    /// One past the last offset seen.
    seen_next: Option<i64>,
    files: BTreeMap<(String, String), FileBuffer>,
    rows: usize,
    bytes: usize,
    opened_at: Option<Instant>,
    /// Manifest commits whose Delta commits have not landed yet, oldest first.
    unpublished: VecDeque<Unpublished>,
}

impl PartitionState {
    /// The next offset this sink would need after a crash right now.
    fn durable(&self) -> Option<i64> {
        self.files
            .values()
            .map(|f| f.file.first_offset())
            .min()
            .or(self.seen_next)
    }
}

pub struct LakeSink {
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    cfg: LakeConfig,
    location: String,
    partitions: HashMap<TopicPartition, PartitionState>,
    /// The tables' Delta logs (`lake.table_format = "delta"`).
    delta: Option<DeltaLog>,
}

/// What a change's file key is made of: server, database, table, and [`day_of`].
type FileSource<'a> = (Option<&'a str>, Option<&'a str>, &'a TableId, Option<i64>);

impl LakeSink {
    pub fn new(cfg: &LakeConfig) -> Result<Self, SinkError> {
        let (store, location) = open_store(cfg)?;
        let delta = match cfg.table_format {
            TableFormat::Delta => Some(DeltaLog::open(cfg, store.clone())?),
            TableFormat::Parquet => None,
        };
        Ok(Self::assemble(store, cfg, location, delta))
    }

    /// A lake over any store (tests wrap one to inject faults); its Delta logs, if configured,
    /// live in the same store.
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        cfg: &LakeConfig,
        location: String,
    ) -> Result<Self, SinkError> {
        let delta = match cfg.table_format {
            TableFormat::Delta => Some(DeltaLog::new(
                cfg,
                store.clone(),
                url::Url::parse("memory:///").expect("a valid URL"),
            )?),
            TableFormat::Parquet => None,
        };
        Ok(Self::assemble(store, cfg, location, delta))
    }

    fn assemble(
        store: Arc<dyn ObjectStore>,
        cfg: &LakeConfig,
        location: String,
        delta: Option<DeltaLog>,
    ) -> Self {
        Self {
            store,
            layout: Layout::new(&cfg.prefix),
            cfg: cfg.clone(),
            location,
            partitions: HashMap::new(),
            delta,
        }
    }

    /// Where the lake is, for humans: a directory or an `s3://` URL.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Cleans up an interrupted commit and loads the partition's checkpoint.
    async fn recover(&mut self, tp: &TopicPartition) -> Result<Option<i64>, SinkError> {
        let pending_path = self.layout.pending(tp);
        match self.store.get(&pending_path).await {
            Ok(res) => {
                let bytes = res.bytes().await.map_err(store_err(&pending_path))?;
                let pending: Pending =
                    serde_json::from_slice(&bytes).map_err(|e| SinkError::Manifest {
                        path: pending_path.to_string(),
                        reason: e.to_string(),
                    })?;
                let commit_path = self.layout.commit(tp, pending.first_offset);
                let committed = match self.store.head(&commit_path).await {
                    Ok(_) => true,
                    Err(object_store::Error::NotFound { .. }) => false,
                    Err(e) => return Err(store_err(&commit_path)(e)),
                };
                if !committed {
                    for p in &pending.paths {
                        let path = crate::sink::lake::manifest::stored_path(p);
                        match self.store.delete(&path).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(store_err(&path)(e)),
                        }
                    }
                    tracing::info!(%tp, objects = pending.paths.len(), "removed objects of an uncommitted lake upload");
                }
                self.store
                    .delete(&pending_path)
                    .await
                    .map_err(store_err(&pending_path))?;
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_err(&pending_path)(e)),
        }
        let commits = read_commits(&*self.store, &self.layout, tp).await?;
        self.republish(tp, &commits).await?;
        let next = commits.last().map(|c| c.next_offset);
        self.partitions.insert(
            tp.clone(),
            PartitionState {
                committed_next: next,
                seen_next: next,
                ..Default::default()
            },
        );
        Ok(next)
    }

    /// The next offset of the furthest commit any writer landed for `tp` starting at or after
    /// `first_offset`, if there is one.
    async fn committed_from(
        &self,
        tp: &TopicPartition,
        first_offset: i64,
    ) -> Result<Option<i64>, SinkError> {
        let dir = self.layout.manifest_dir(tp);
        // Commit names are zero-padded first offsets, so "after the name of first_offset - 1"
        // is "at or after first_offset" (listing is by key).
        let listing = match first_offset.checked_sub(1).filter(|o| *o >= 0) {
            Some(before) => self
                .store
                .list_with_offset(Some(&dir), &self.layout.commit(tp, before)),
            None => self.store.list(Some(&dir)),
        };
        match commit_paths(listing, &dir).await?.pop() {
            Some(last) => Ok(Some(
                read_json::<Commit>(&*self.store, &last).await?.next_offset,
            )),
            None => Ok(None),
        }
    }

    fn is_due(&self, st: &PartitionState) -> bool {
        st.rows >= self.cfg.roll_rows || st.bytes as u64 >= self.cfg.roll_bytes.0
    }

    /// Uploads a partition's buffered files and commits them in the manifest.
    /// With Delta tables, the commit's Delta side is queued for [`Self::publish_backlogs`].
    async fn commit_partition(&mut self, tp: &TopicPartition) -> Result<(), SinkError> {
        let Some(first_offset) = self
            .partitions
            .get(tp)
            .filter(|st| !st.files.is_empty())
            .map(|st| {
                st.committed_next
                    .expect("set when the first record arrived")
            })
        else {
            return Ok(());
        };
        // Data files are named by their first offset, so a writer with a stale view (an owner
        // that missed its revoke, or this sink after a commit whose answer was lost) would
        // overwrite committed files. Check before uploading anything; the partition is then
        // recovered from the manifest on the next write.
        if let Some(theirs) = self.committed_from(tp, first_offset).await? {
            self.partitions.remove(tp);
            return Err(SinkError::Fenced {
                sink: NAME,
                tp: tp.clone(),
                theirs,
            });
        }
        // New files fit their Delta tables' current schemas.
        let table_schemas = match self.delta.as_mut() {
            Some(delta) => {
                let dirs: Vec<String> = self.partitions[tp]
                    .files
                    .keys()
                    .map(|k| k.0.clone())
                    .collect();
                delta.table_schemas(dirs.iter().map(String::as_str)).await?
            }
            None => HashMap::new(),
        };
        let st = self.partitions.get_mut(tp).expect("present above");
        let next_offset = st.seen_next.expect("set when the first record arrived");
        let mut files = std::mem::take(&mut st.files);
        // Each file's rows as one record batch; the builders keep them for a retry.
        let finished = files
            .iter_mut()
            .map(|(_, f)| {
                f.file.finish().map_err(|reason| SinkError::Encode {
                    table: f.file.table().to_string(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>();
        let finished = match finished {
            Ok(finished) => finished,
            Err(e) => {
                self.partitions.get_mut(tp).expect("present above").files = files;
                return Err(e);
            }
        };
        let paths: Vec<(Path, &(String, String), &FileBuffer, _)> = files
            .iter()
            .zip(finished)
            .map(|((k, f), finished)| {
                let first = f.file.first_offset();
                (self.layout.data_file(&k.0, &k.1, tp, first), k, f, finished)
            })
            .collect();

        let pending_path = self.layout.pending(tp);
        let pending = Pending {
            first_offset,
            paths: paths.iter().map(|(p, ..)| p.to_string()).collect(),
        };
        let result = async {
            self.store
                .put(
                    &pending_path,
                    PutPayload::from(serde_json::to_vec(&pending).expect("serialises")),
                )
                .await
                .map_err(store_err(&pending_path))?;
            let delta = self.delta.is_some();
            let layout = &self.layout;
            let table_schemas = &table_schemas;
            let uploads = paths
                .iter()
                .map(|(path, (dir, date), f, (batch, metadata))| {
                    let store = self.store.clone();
                    let file_for = if delta {
                        FileFor::Delta(table_schemas.get(dir).map(|s| s.as_ref()))
                    } else {
                        FileFor::Parquet
                    };
                    // The source table as the raw log names it (`source_table`), which prune and
                    // replay match against; the directory is only where the file lives.
                    let table = f.file.table().to_string();
                    async move {
                        let encode_err = |reason| SinkError::Encode {
                            table: table.clone(),
                            reason,
                        };
                        let bytes = bytes::Bytes::from(
                            encode::encode_file(batch, metadata.clone(), file_for)
                                .map_err(encode_err)?,
                        );
                        let delta_file = if delta {
                            let (_, relative) =
                                layout.table_part(path.as_ref()).expect("a data file");
                            let file = DeltaFile::from_parquet(&relative, date, &bytes)
                                .map_err(encode_err)?;
                            Some((dir.clone(), table.clone(), file))
                        } else {
                            None
                        };
                        let len = bytes.len() as u64;
                        store
                            .put(path, PutPayload::from(bytes))
                            .await
                            .map_err(store_err(path))?;
                        let entry = FileEntry {
                            path: path.to_string(),
                            table: table.clone(),
                            date: date.clone(),
                            rows: f.file.rows() as u64,
                            bytes: len,
                            min_offset: f.file.first_offset(),
                            max_offset: f.file.last_offset(),
                        };
                        Ok::<_, SinkError>((entry, delta_file))
                    }
                });
            let (entries, delta_files): (Vec<FileEntry>, Vec<_>) =
                try_join_all(uploads).await?.into_iter().unzip();
            let commit = Commit {
                topic: tp.topic.clone(),
                partition: tp.partition,
                first_offset,
                next_offset,
                files: entries,
                committed_at: chrono::Utc::now().to_rfc3339(),
            };
            let commit_path = self.layout.commit(tp, first_offset);
            let body = serde_json::to_vec_pretty(&commit).expect("serialises");
            let create = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self
                .store
                .put_opts(&commit_path, PutPayload::from(body), create)
                .await
            {
                Ok(_) => {}
                Err(object_store::Error::AlreadyExists { .. }) => {
                    // Either our own earlier attempt succeeded (lost response), or another
                    // consumer now owns this partition.
                    let theirs: Commit = read_json(&*self.store, &commit_path).await?;
                    if theirs.next_offset != commit.next_offset || theirs.files != commit.files {
                        return Err(SinkError::Fenced {
                            sink: NAME,
                            tp: tp.clone(),
                            theirs: theirs.next_offset,
                        });
                    }
                }
                Err(e) => return Err(store_err(&commit_path)(e)),
            }
            self.store
                .delete(&pending_path)
                .await
                .map_err(store_err(&pending_path))?;
            Ok::<_, SinkError>((commit, delta_files))
        }
        .await;
        match result {
            Ok((commit, delta_files)) => {
                let st = self.partitions.get_mut(tp).expect("present above");
                st.committed_next = Some(commit.next_offset);
                st.rows = 0;
                st.bytes = 0;
                st.opened_at = None;
                tracing::debug!(%tp, first = first_offset, next = next_offset, files = commit.files.len(), "lake commit");
                if self.delta.is_some() {
                    st.unpublished.push_back(Unpublished {
                        next_offset,
                        files: delta_files.into_iter().flatten().collect(),
                    });
                }
                Ok(())
            }
            Err(e) => {
                if matches!(e, SinkError::Fenced { .. }) {
                    self.partitions.remove(tp);
                } else if let Some(st) = self.partitions.get_mut(tp) {
                    // Keep the records for the retry; the pending file lets a restart clean up.
                    st.files = files;
                }
                Err(e)
            }
        }
    }

    fn acks(&self, tps: impl Iterator<Item = TopicPartition>) -> Offsets {
        tps.filter_map(|tp| {
            let d = self.partitions.get(&tp)?.durable()?;
            Some((tp, d))
        })
        .collect()
    }
}

impl Sink for LakeSink {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn checkpoints(&mut self, partitions: &[TopicPartition]) -> Result<Offsets, SinkError> {
        let mut out = Offsets::new();
        for tp in partitions {
            if let Some(next) = self.recover(tp).await? {
                out.insert(tp.clone(), next);
            }
        }
        Ok(out)
    }

    async fn write(&mut self, batch: &Batch) -> Result<Ack, SinkError> {
        let mut stats = WriteStats::default();
        let ranges = batch.ranges();
        for (tp, (start, _)) in &ranges {
            if !self.partitions.contains_key(tp) {
                self.recover(tp).await?;
            }
            // The batch must continue from what this sink holds (buffered or committed): a
            // later start would put records of no file inside a manifest range.
            let st = &self.partitions[tp];
            if let Some(next) = st.seen_next.or(st.committed_next) {
                if *start > next {
                    return Err(SinkError::CheckpointGap {
                        sink: NAME,
                        tp: tp.clone(),
                        stored: next,
                        batch_start: *start,
                    });
                }
            }
        }
        let mut last_file: Option<(FileSource, (String, String))> = None;
        // A batch holds runs of one partition: its name is copied once per run, not per record.
        let mut tp: Option<TopicPartition> = None;
        for r in &batch.records {
            let coords = r.coords();
            let tp = match &tp {
                Some(t) if t.partition == coords.partition && t.topic == coords.topic => t,
                _ => tp.insert(coords.topic_partition()),
            };
            let st = self.partitions.get_mut(tp).expect("recovered above");
            // Below the commit: stored. Below what was seen: already buffered, e.g. when the
            // pipeline retries a batch whose commit failed (an S3 outage) after buffering it.
            let below = |next: Option<i64>| next.is_some_and(|n| coords.offset < n);
            if below(st.committed_next) || below(st.seen_next) {
                stats.already_stored += 1;
                continue;
            }
            st.committed_next.get_or_insert(coords.offset);
            st.seen_next = Some(st.seen_next.unwrap_or(0).max(coords.offset + 1));
            let Some(e) = stats.change(r) else { continue };
            // Any name is a valid path once encoded (Layout): every change lands in a file.
            let source = (
                e.source.name.as_deref(),
                e.source.db.as_deref(),
                &e.table,
                day_of(e.event_time_ms()),
            );
            // Consecutive changes mostly share a table and a day: their file key is built once.
            if last_file.as_ref().is_none_or(|(last, _)| *last != source) {
                let (server, db) = (source.0.unwrap_or(""), source.1.unwrap_or(""));
                let dir = manifest::table_dir(self.cfg.layout, (server, db), &e.table);
                last_file = Some((source, (dir, date_of(e.event_time_ms()))));
            }
            let key = &last_file.as_ref().expect("set above").1;
            let declared = e.schema.declared.then(|| e.schema.clone());
            let needs_roll = st.files.get(key).is_some_and(|f| {
                // The file already took the previous change's schema.
                !f.file.has_schema_of_last(&e.schema)
                    && match (&f.declared, &declared) {
                        (Some(a), Some(b)) => !Arc::ptr_eq(a, b) && a != b,
                        (None, None) => f.file.schema().conflicts(&e.schema),
                        _ => true,
                    }
            });
            if needs_roll {
                // A schema change (declared, or an inferred type that cannot widen) starts a
                // new file: commit what we have first.
                self.commit_partition(tp).await?;
            }
            let st = self.partitions.get_mut(tp).expect("still owned");
            // Looked up by reference: the key is copied only when a file opens.
            match st.files.get_mut(key) {
                Some(open) => open.file.push(e),
                None => {
                    let file = FileBuilder::new(e);
                    st.files.insert(key.clone(), FileBuffer { file, declared });
                }
            }
            st.rows += 1;
            st.bytes += e.size_bytes();
            st.opened_at.get_or_insert_with(Instant::now);
            stats.written += 1;
        }
        let due: Vec<TopicPartition> = ranges
            .keys()
            .filter(|tp| self.partitions.get(*tp).is_some_and(|st| self.is_due(st)))
            .cloned()
            .collect();
        for tp in &due {
            self.commit_partition(tp).await?;
        }
        // Over the memory budget: commit the biggest buffers first.
        while self.partitions.values().map(|st| st.bytes).sum::<usize>() as u64
            > self.cfg.max_buffer_bytes.0
        {
            let biggest = self
                .partitions
                .iter()
                .filter(|(_, st)| !st.files.is_empty())
                .max_by_key(|(_, st)| st.bytes)
                .map(|(tp, _)| tp.clone());
            let Some(tp) = biggest else { break };
            self.commit_partition(&tp).await?;
        }
        self.publish_backlogs().await?;
        Ok(Ack {
            durable: self.acks(ranges.into_keys()),
            stats,
        })
    }

    async fn flush(&mut self, force: bool) -> Result<Ack, SinkError> {
        let roll_age = self.cfg.roll_age.0;
        let due: Vec<TopicPartition> = self
            .partitions
            .iter()
            .filter(|(_, st)| {
                !st.files.is_empty()
                    && (force || st.opened_at.is_some_and(|t| t.elapsed() >= roll_age))
            })
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in &due {
            self.commit_partition(tp).await?;
        }
        self.publish_backlogs().await?;
        Ok(Ack {
            durable: self.acks(
                self.partitions
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .into_iter(),
            ),
            stats: WriteStats::default(),
        })
    }

    fn revoke(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            self.partitions.remove(tp);
            if let Some(delta) = self.delta.as_mut() {
                delta.forget(tp);
            }
        }
    }
}
