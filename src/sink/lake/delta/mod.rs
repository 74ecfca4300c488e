//! Delta Lake commits over the lake's files: each source table's directory
//! (`cdc_events/table=<…>/`) is a Delta table partitioned by `date`.
//!
//! The manifest stays the lake's checkpoint; the Delta log is what other engines read. After
//! the manifest commits of a write or a flush land (one per topic-partition that rolled), one
//! Delta commit per table they touched adds their files, carries a `metaData` action when they
//! bring new columns, and records a `txn` action for each topic-partition (app id
//! `cdc-lake/<topic>/<partition>`, version = the partition's next offset after its files).
//! Gathering the partitions into one Delta commit per table keeps the number of Delta commits
//! (each a log write and a snapshot update) independent of the partition count.
//! A table whose txn version for the partition is already at or past that offset has the files:
//! the commit is skipped, so a republish after a crash adds nothing twice. On assignment, the
//! manifest commits a table has not recorded yet are republished ([`DeltaLog::republish`]).
//!
//! Commits are put-if-absent on `_delta_log/<version>.json` (object_store's create mode, which
//! S3 serves as `If-None-Match: *`); a concurrent writer's commit is checked for conflicts and
//! the commit retried. Snapshots are loaded without their file lists and reloaded before the
//! files committed since gather ([`SNAPSHOT_STATS_BUDGET`]), so the pod's memory does not grow
//! with a table's file count; checkpoints and log cleanup run every
//! `lake.delta.checkpoint_interval` commits.

mod commit;
mod replace;
pub mod stats;
pub mod types;

pub use commit::{ManifestCommit, TableFile};
pub use replace::{compaction_app_id, Replaced};

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::Schema as ArrowSchema;
use deltalake_core::kernel::engine::arrow_conversion::TryFromKernel;
use deltalake_core::kernel::transaction::TransactionError;
use deltalake_core::logstore::{default_logstore, LogStoreRef, StorageConfig};
use deltalake_core::{DeltaTable, DeltaTableConfig, DeltaTableError};
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use url::Url;

use crate::config::{DeltaConfig, LakeConfig};
use crate::domain::TopicPartition;
use crate::sink::SinkError;

/// How often one table commit is tried when other writers keep winning the version race.
const MAX_ATTEMPTS: usize = 8;

/// Whether a failed commit only lost the version race to other writers: deltalake found a
/// conflict, or its own retries (`with_max_retries`) ran out while a writer kept committing
/// (a compaction's swap beside a pod that commits every few milliseconds). The table is then
/// reloaded and the commit decided again after [`back_off`].
fn lost_the_race(e: &DeltaTableError) -> bool {
    matches!(
        e,
        DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(_) | TransactionError::MaxCommitAttempts(_),
        }
    )
}

/// A growing pause with jitter before attempt `attempt + 1`, so that two writers racing for
/// versions do not keep colliding.
async fn back_off(attempt: usize) {
    let jitter = u64::from(std::process::id() ^ chrono::Utc::now().timestamp_subsec_nanos()) % 20;
    tokio::time::sleep(std::time::Duration::from_millis(
        20 * attempt as u64 + jitter,
    ))
    .await;
}

/// The Delta app id of a topic-partition's `txn` actions.
pub fn app_id(tp: &TopicPartition) -> String {
    format!("cdc-lake/{}/{}", tp.topic, tp.partition)
}

/// One table's log, as this pod last saw it.
struct Table {
    delta: DeltaTable,
    /// The txn versions known to be current for this snapshot, per app: read from the log after
    /// loading, or set by this pod's own commits since (a partition's app is this pod's own
    /// while it owns the partition).
    known_apps: HashMap<String, Option<i64>>,
    /// Commits this pod made since it loaded the table (see [`SNAPSHOT_STATS_BUDGET`]).
    commits_since_load: usize,
}

/// How much file metadata a table's snapshot may gather before it is loaded afresh, in
/// commits × columns. A table is loaded without its file list, but deltalake's post-commit
/// snapshot (`EagerSnapshot::update`) keeps every file committed since the load, with its
/// statistics parsed per column: held for the life of the pod, that grows without bound (as
/// kafka-delta-ingest#227 saw), fastest for wide tables. So a table is reloaded after each
/// checkpoint (cheap then: the checkpoint and no commits) and once its commits since the load
/// times its columns pass this: every 100 commits of a 100-column table, every 5 of a
/// 2,000-column one.
const SNAPSHOT_STATS_BUDGET: usize = 10_000;

/// The Delta logs of the lake's tables.
pub struct DeltaLog {
    /// The store deltalake addresses by full URL path: the bucket for S3, the filesystem root
    /// for a local lake.
    root_store: Arc<dyn ObjectStore>,
    /// URL of `cdc_events/` (with a trailing slash).
    events_url: Url,
    cfg: DeltaConfig,
    tables: HashMap<String, Table>,
}

fn delta_err(table: &str) -> impl FnOnce(DeltaTableError) -> SinkError + '_ {
    move |source| SinkError::Delta {
        table: table.to_string(),
        source: Box::new(source),
    }
}

impl DeltaLog {
    /// The Delta logs of `cfg`'s lake in its own store: `s3://<bucket>/<prefix>/` or the
    /// local root's `file://` URL.
    pub fn open(cfg: &LakeConfig, lake_store: Arc<dyn ObjectStore>) -> Result<Self, SinkError> {
        let bad = |reason: String| SinkError::Mapping {
            target: "lake",
            reason,
        };
        match &cfg.s3 {
            Some(s3) => Self::new(
                cfg,
                lake_store,
                Url::parse(&format!("s3://{}/", s3.bucket)).map_err(|e| bad(e.to_string()))?,
            ),
            None => {
                let root = std::fs::canonicalize(&cfg.root).unwrap_or_else(|_| cfg.root.clone());
                let url = Url::from_directory_path(&root)
                    .map_err(|()| bad(format!("lake.root {} is not absolute", root.display())))?;
                Self::new(cfg, Arc::new(LocalFileSystem::new()), url)
            }
        }
    }

    /// The Delta logs of a lake in `root_store` at `root_url` (whose path is the store's
    /// object path of the lake's root, before `cfg.prefix`). Any store works with a
    /// `memory:///` URL (tests over wrapped stores).
    pub fn new(
        cfg: &LakeConfig,
        root_store: Arc<dyn ObjectStore>,
        root_url: Url,
    ) -> Result<Self, SinkError> {
        let mut events_url = root_url;
        {
            let mut segments = events_url
                .path_segments_mut()
                .map_err(|()| SinkError::Mapping {
                    target: "lake",
                    reason: "the lake URL cannot have a path".into(),
                })?;
            segments.pop_if_empty();
            for part in cfg.prefix.split('/').filter(|p| !p.is_empty()) {
                segments.push(part);
            }
            segments.push("cdc_events");
            segments.push("");
        }
        Ok(Self {
            root_store,
            events_url,
            cfg: cfg.delta.clone(),
            tables: HashMap::new(),
        })
    }

    /// The URL of a table's root (`table_dir` as the layout names it, escapes included).
    pub fn table_url(&self, table_dir: &str) -> Url {
        let mut url = self.events_url.clone();
        {
            let mut segments = url.path_segments_mut().expect("checked in new");
            segments.pop_if_empty();
            for part in table_dir.split('/') {
                segments.push(part);
            }
            segments.push("");
        }
        url
    }

    fn log_store(&self, url: &Url) -> LogStoreRef {
        let prefix = object_store::path::Path::from_url_path(url.path())
            .unwrap_or_else(|_| object_store::path::Path::from(url.path()));
        let prefixed: Arc<dyn ObjectStore> =
            Arc::new(PrefixStore::new(self.root_store.clone(), prefix));
        default_logstore(
            prefixed,
            self.root_store.clone(),
            url,
            &StorageConfig::default(),
        )
    }

    /// The table, loaded (without its file list) if this pod has not seen it yet; its state is
    /// None while the table does not exist.
    async fn table(&mut self, table_dir: &str) -> Result<&mut Table, SinkError> {
        if !self.tables.contains_key(table_dir) {
            let url = self.table_url(table_dir);
            let log_store = self.log_store(&url);
            let mut delta = DeltaTable::new(
                log_store.clone(),
                DeltaTableConfig {
                    require_files: false,
                    ..Default::default()
                },
            );
            if log_store
                .is_delta_table_location()
                .await
                .map_err(delta_err(table_dir))?
            {
                delta.load().await.map_err(delta_err(table_dir))?;
            }
            self.tables.insert(
                table_dir.to_string(),
                Table {
                    delta,
                    known_apps: HashMap::new(),
                    commits_since_load: 0,
                },
            );
        }
        Ok(self.tables.get_mut(table_dir).expect("inserted above"))
    }

    /// How many files the table's snapshot holds in memory (those committed since its load).
    #[cfg(test)]
    fn files_held(&self, table_dir: &str) -> usize {
        self.tables
            .get(table_dir)
            .and_then(|t| t.delta.state.as_ref())
            .map_or(0, |s| s.log_data().num_files())
    }

    /// Loads a table afresh, without the files its snapshot gathered since the last load
    /// ([`SNAPSHOT_STATS_BUDGET`]). What this pod knows of its own txn versions still holds.
    async fn reload(&mut self, table_dir: &str) -> Result<(), SinkError> {
        let known_apps = self
            .tables
            .remove(table_dir)
            .map(|t| t.known_apps)
            .unwrap_or_default();
        self.table(table_dir).await?.known_apps = known_apps;
        Ok(())
    }

    /// The current schema of each table (None for a table that does not exist yet), loading
    /// the tables this pod has not seen: new files are written to fit it.
    pub async fn table_schemas<'a>(
        &mut self,
        table_dirs: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashMap<String, Arc<ArrowSchema>>, SinkError> {
        let mut out = HashMap::new();
        for dir in table_dirs.into_iter().filter(|d| Self::covers(d)) {
            let table = self.table(dir).await?;
            if let Some(state) = table.delta.state.as_ref() {
                let schema = ArrowSchema::try_from_kernel(state.schema().as_ref())
                    .map_err(|e| delta_err(dir)(e.into()))?;
                out.insert(dir.to_string(), Arc::new(schema));
            }
        }
        Ok(out)
    }

    /// The last offset range end this table recorded for `tp`: what this pod knows of its own
    /// partition (read once from the log, then set by its commits), else read from the log.
    pub async fn recorded(
        &mut self,
        table_dir: &str,
        tp: &TopicPartition,
    ) -> Result<Option<i64>, SinkError> {
        let app = app_id(tp);
        if let Some(known) = self
            .tables
            .get(table_dir)
            .and_then(|t| t.known_apps.get(&app))
        {
            return Ok(*known);
        }
        let version = self.recorded_app(table_dir, app.clone()).await?;
        let table = self
            .tables
            .get_mut(table_dir)
            .expect("loaded by recorded_app");
        if table.delta.state.is_some() {
            table.known_apps.insert(app, version);
        }
        Ok(version)
    }

    /// The txn version of `app` in the table's log (None while the table does not exist).
    async fn recorded_app(
        &mut self,
        table_dir: &str,
        app: String,
    ) -> Result<Option<i64>, SinkError> {
        let table = self.table(table_dir).await?;
        let Some(state) = table.delta.state.as_ref() else {
            return Ok(None);
        };
        let log_store = table.delta.log_store();
        state
            .transaction_version(log_store.as_ref(), &app)
            .await
            .map_err(delta_err(table_dir))
    }

    /// Forgets what this pod knew of `tp`'s txn versions (on a revoke: another owner may commit
    /// for it next).
    pub fn forget(&mut self, tp: &TopicPartition) {
        let app = app_id(tp);
        for t in self.tables.values_mut() {
            t.known_apps.remove(&app);
        }
    }

    /// After a failed commit to a table: the table is forgotten (the next attempt loads it
    /// afresh). A commit that only lost the version race to another writer gets Ok, after
    /// [`back_off`], to be decided and tried again while attempts remain; any other error is
    /// returned, naming the table.
    async fn after_failed_commit(
        &mut self,
        table_dir: &str,
        attempt: usize,
        e: DeltaTableError,
        what: &str,
    ) -> Result<(), SinkError> {
        self.tables.remove(table_dir);
        if attempt < MAX_ATTEMPTS && lost_the_race(&e) {
            tracing::info!(table = table_dir, error = %e, "{what} conflict; reloading the table");
            back_off(attempt).await;
            return Ok(());
        }
        Err(delta_err(table_dir)(e))
    }

    /// Whether a table directory gets a Delta log. Not yet for names the lake had to escape
    /// (`%XX` in the directory: `/`, `\`, a leading dot, …): delta-kernel 0.19 resolves the
    /// objects it lists under such a root one escape level short (found by the fault suite's
    /// path-unsafe table names), so their tables could never be read or committed to. Their
    /// files stay in the manifest and the plain-Parquet layout.
    pub fn covers(table_dir: &str) -> bool {
        !table_dir.contains('%')
    }
}

/// A checkpoint of the table at its current version, then the cleanup of expired commits.
/// Both only make the log smaller: a failure is logged and the next interval tries again.
async fn checkpoint(table: &DeltaTable, table_dir: &str) {
    if let Err(e) = deltalake_core::checkpoints::create_checkpoint(table, None).await {
        tracing::warn!(table = table_dir, error = %e, "Delta checkpoint failed; the next one will retry");
        return;
    }
    match deltalake_core::checkpoints::cleanup_metadata(table, None).await {
        Ok(n) if n > 0 => tracing::debug!(
            table = table_dir,
            removed = n,
            "expired Delta log entries removed"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(table = table_dir, error = %e, "Delta log cleanup failed"),
    }
}

#[cfg(test)]
mod tests;
