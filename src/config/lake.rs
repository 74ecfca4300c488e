//! `[lake]`: the Parquet lake and its object store.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ByteSize, HumanDuration, Secret};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LakeConfig {
    pub enabled: bool,
    /// Local directory used when no `s3` section is given.
    pub root: PathBuf,
    /// Key prefix inside the bucket or directory.
    pub prefix: String,
    pub s3: Option<S3Config>,
    /// A file closes at this many rows...
    pub roll_rows: usize,
    /// ...or this many bytes of envelopes...
    pub roll_bytes: ByteSize,
    /// ...or when its oldest record has waited this long.
    pub roll_age: HumanDuration,
    /// Memory for buffered records across all partitions; above it the largest partition is
    /// committed early. Bounds the pod's memory on a backlog.
    pub max_buffer_bytes: ByteSize,
    /// `table`: `cdc_events/table=<schema.table>/…`. `source`: one directory per source
    /// database first, `cdc_events/server=<server>/db=<db>/table=<schema.table>/…`, for
    /// several connectors whose tables share names.
    pub layout: LakeLayout,
    /// `delta` (default): every source table's directory is also a Delta Lake table (a
    /// `_delta_log/` beside its `date=` directories, one commit per table for the manifest
    /// commits of each write or flush).
    /// `parquet`: the Hive-partitioned files and the manifest only.
    pub table_format: TableFormat,
    pub delta: DeltaConfig,
    pub compaction: CompactionConfig,
}

/// `[lake.compaction]`: what `cdc-lake lake compact` does by default, and whether the pod
/// compacts on its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionConfig {
    /// A compacted file holds up to about this many bytes of the files it merges.
    pub target_size: ByteSize,
    /// Replaced files are deleted this long after their compaction. Until then a plain glob
    /// over the files sees their rows twice; Delta readers and cdc-lake never do, and time
    /// travel to a version before the compaction works. Unset: 7 days with Delta tables (as
    /// Delta's own VACUUM keeps), 1 hour without (only readers already running need them).
    pub retention: Option<HumanDuration>,
    /// The pod compacts the lake itself: once at start-up, then this long after each run ends,
    /// beside ingest (a compaction never blocks it). Unset: only `cdc-lake lake compact` does.
    /// Several pods on one lake take turns through the compaction lease.
    pub every: Option<HumanDuration>,
    /// With `every`: the pod compacts today's date (UTC) too, whose files it is still writing.
    /// Fewer files during the day, at the cost of rewrites: a compacted file below the target
    /// size is merged again with the small files written after it. Default: dates before
    /// today only, each compacted once.
    pub include_today: bool,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            target_size: ByteSize(256 << 20),
            retention: None,
            every: None,
            include_today: false,
        }
    }
}

impl LakeConfig {
    /// How long replaced files stay after a compaction ([`CompactionConfig::retention`]).
    pub fn compaction_retention(&self) -> Duration {
        match (self.compaction.retention, self.table_format) {
            (Some(r), _) => r.0,
            (None, TableFormat::Delta) => Duration::from_secs(7 * 24 * 3600),
            (None, TableFormat::Parquet) => Duration::from_secs(3600),
        }
    }
}

/// What readers other than cdc-lake see of the lake (see [`LakeConfig::table_format`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TableFormat {
    /// The default: the bench's lake-alone run costs about 6% of plain Parquet's throughput
    /// and the 1M backlog about 5% more memory (docs/performance.md).
    #[default]
    Delta,
    Parquet,
}

/// `[lake.delta]`: how the Delta log is kept small.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeltaConfig {
    /// A Parquet checkpoint of a table's log every this many commits, so a reader replays at
    /// most this many JSON commits.
    pub checkpoint_interval: u64,
    /// Commits older than this (and older than the latest checkpoint) are deleted after a
    /// checkpoint. Time travel reaches back this far.
    pub log_retention: HumanDuration,
}

impl Default for DeltaConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: 100,
            log_retention: HumanDuration(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

/// How the lake's directories are laid out (see [`LakeConfig::layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LakeLayout {
    #[default]
    Table,
    Source,
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            root: PathBuf::from("lake"),
            prefix: String::new(),
            s3: None,
            roll_rows: 200_000,
            roll_bytes: ByteSize(64 << 20),
            roll_age: HumanDuration(Duration::from_secs(10)),
            max_buffer_bytes: ByteSize(64 << 20),
            layout: LakeLayout::Table,
            table_format: TableFormat::default(),
            delta: DeltaConfig::default(),
            compaction: CompactionConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// S3 API endpoint for MinIO and other S3-compatible servers; omit for AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    #[serde(skip)]
    pub secret_access_key: Option<Secret>,
    /// Allow plain HTTP (local MinIO); off by default.
    #[serde(default)]
    pub allow_http: bool,
    /// How long one S3 request may take. A hung endpoint then surfaces as an error (the pod
    /// turns not-ready and retries) instead of a stall.
    #[serde(default = "default_s3_timeout")]
    pub request_timeout: HumanDuration,
}

fn default_s3_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_region() -> String {
    "us-east-1".into()
}
