//! `cdc-lake lake compact`: merges each table's small lake files, per date and
//! topic-partition, into files of about the target size.
//!
//! Per partition, in this order:
//! 1. **Finish** what a compaction that died left ([`maintain`]): uploads whose record never
//!    landed are deleted (the lake is as before it started); records whose Delta commits did
//!    not all land get them (the record is the commit point, Delta follows, as for appends).
//! 2. **Vacuum**: files replaced longer ago than the retention are deleted.
//! 3. **Plan** runs of consecutive small files ([`plan`]), only of files every Delta reader
//!    already has, and **merge** each ([`merge`]): batches copied in offset order.
//! 4. Upload the merged files (named in `<sequence>.pending.json` first), write the
//!    compaction record create-only ([`crate::sink::lake::compaction`]), then one Delta commit
//!    per table swaps the files (`remove` + `add`).
//!
//! A lease ([`lock`]) keeps it to one compaction per lake at a time. The pod can run it on a
//! timer ([`schedule`], `[lake.compaction] every`).

mod lock;
mod maintain;
pub mod merge;
mod partition;
pub mod plan;
pub mod schedule;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{ByteSize, Config, HumanDuration, TableFormat};
use crate::domain::TopicPartition;
use crate::sink::lake::delta::DeltaLog;
use crate::sink::lake::manifest::Layout;
use crate::sink::lake::{lake_partitions, open_store};
use crate::sink::SinkError;

use self::lock::CompactionLock;
use self::partition::Compactor;

/// `cdc-lake lake compact` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CompactArgs {
    /// Only this source table, as the raw log names it (`public.orders`).
    #[arg(long, value_name = "SCHEMA.TABLE")]
    pub table: Option<String>,
    /// Only dates (the lake's `date=` directories) before this one, YYYY-MM-DD. Default: today
    /// (UTC), whose files are still being written.
    #[arg(long, value_name = "DATE")]
    pub before: Option<String>,
    /// Size of the files to write [default: lake.compaction.target_size, 256MiB].
    #[arg(long, value_name = "SIZE")]
    pub target_size: Option<ByteSize>,
    /// How long replaced files stay before they are deleted [default:
    /// lake.compaction.retention: 7d with Delta tables, 1h without].
    #[arg(long, value_name = "DURATION")]
    pub retention: Option<HumanDuration>,
    /// Print what would be merged; change nothing (not even a dead compaction's leftovers).
    #[arg(long)]
    pub dry_run: bool,
}

/// What one compaction run does.
#[derive(Debug, Clone)]
pub struct Options {
    pub eligibility: plan::Eligibility,
    pub retention: Duration,
    pub dry_run: bool,
    /// Cancelled: the run stops before its next partition and releases the lease (the pod's
    /// shutdown). What it finished stays; a partition is never left half done.
    pub stop: CancellationToken,
}

impl Options {
    /// The arguments over the config's defaults; a bad date is a bad argument.
    pub fn from_args(config: &Config, args: &CompactArgs) -> Result<Self, CompactError> {
        let before = match &args.before {
            Some(d) => {
                chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|e| {
                    CompactError::BadArguments(format!(
                        "--before {d:?} is not a YYYY-MM-DD date: {e}"
                    ))
                })?;
                d.clone()
            }
            None => chrono::Utc::now().format("%Y-%m-%d").to_string(),
        };
        let target_size = args
            .target_size
            .unwrap_or(config.lake.compaction.target_size)
            .0;
        if target_size == 0 {
            return Err(CompactError::BadArguments(
                "--target-size must be above 0".into(),
            ));
        }
        Ok(Self {
            eligibility: plan::Eligibility {
                table: args.table.clone(),
                before: Some(before),
                target_size,
            },
            retention: args
                .retention
                .map_or_else(|| config.lake.compaction_retention(), |r| r.0),
            dry_run: args.dry_run,
            stop: CancellationToken::new(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("{0}")]
    BadArguments(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Lake(#[from] SinkError),
    #[error("{tp}: {reason}")]
    Corrupt { tp: TopicPartition, reason: String },
}

/// What a run did to one partition.
#[derive(Debug, Default, Clone)]
pub struct PartitionReport {
    pub tp: Option<TopicPartition>,
    /// Current files before and after.
    pub files_before: usize,
    pub files_after: usize,
    /// Files written, and the files they replace.
    pub written: usize,
    pub replaced: usize,
    pub bytes_written: u64,
    /// Replaced files deleted after the retention.
    pub vacuumed: usize,
    /// Leftovers of a compaction that died: uploads deleted, Delta commits landed.
    pub undone_uploads: usize,
    pub finished_delta_commits: usize,
}

/// Crashes the process here when `CDC_LAKE_CRASH_AT` names this point: how the tests kill a
/// compaction at an exact step (an abort, like `kill -9`, runs no cleanup).
pub(crate) fn crash_point(name: &str) {
    if std::env::var("CDC_LAKE_CRASH_AT").is_ok_and(|at| at == name) {
        eprintln!("cdc-lake: crashing at {name} (CDC_LAKE_CRASH_AT)");
        std::process::abort();
    }
}

/// Compacts every partition of the lake, calling `progress` after each.
pub async fn compact(
    config: &Config,
    options: &Options,
    mut progress: impl FnMut(&PartitionReport),
) -> Result<Vec<PartitionReport>, CompactError> {
    if !config.lake.enabled {
        return Err(CompactError::Refused(
            "the lake is not enabled ([lake] enabled = false): nothing to compact".into(),
        ));
    }
    let (store, _) = open_store(&config.lake)?;
    let layout = Layout::new(&config.lake.prefix);
    let delta = match config.lake.table_format {
        TableFormat::Delta => Some(DeltaLog::open(&config.lake, store.clone())?),
        TableFormat::Parquet => None,
    };
    let partitions = lake_partitions(&*store, &config.lake.prefix).await?;
    let mut lock = match options.dry_run {
        true => None,
        false => Some(CompactionLock::acquire(Arc::clone(&store), layout.compaction_lock()).await?),
    };
    let mut compactor = Compactor::new(store, layout, delta, options.clone());
    let mut reports = Vec::new();
    let result = async {
        for tp in &partitions {
            if options.stop.is_cancelled() {
                break;
            }
            let report = compactor.partition(tp).await?;
            progress(&report);
            reports.push(report);
            if let Some(lock) = lock.as_mut() {
                lock.renew().await?;
            }
        }
        Ok::<_, CompactError>(())
    }
    .await;
    // A failed run keeps its lease only until this process is gone; releasing it here lets the
    // next run start at once, and that run finishes or undoes what this one left.
    if let Some(lock) = lock {
        lock.release().await?;
    }
    result.map(|()| reports)
}

/// Runs `cdc-lake lake compact` and prints a line per partition that changed, then a summary.
pub async fn cli_compact(config: &Config, args: &CompactArgs) -> Result<ExitCode, CompactError> {
    let options = Options::from_args(config, args)?;
    let verb = if options.dry_run {
        "would merge"
    } else {
        "merged"
    };
    let reports = compact(config, &options, |r| {
        let tp = r.tp.as_ref().expect("set per partition");
        if r.written + r.vacuumed + r.undone_uploads + r.finished_delta_commits > 0 {
            println!(
                "{tp}: {verb} {} files into {} ({:.1} MiB); {} -> {} files; vacuumed {}; \
                 leftovers: {} uploads undone, {} Delta commits finished",
                r.replaced,
                r.written,
                r.bytes_written as f64 / (1 << 20) as f64,
                r.files_before,
                r.files_after,
                r.vacuumed,
                r.undone_uploads,
                r.finished_delta_commits
            );
        }
    })
    .await?;
    let sum = |f: fn(&PartitionReport) -> usize| reports.iter().map(f).sum::<usize>();
    println!(
        "{} partitions: {} files -> {}; {} written, {} replaced, {} vacuumed",
        reports.len(),
        sum(|r| r.files_before),
        sum(|r| r.files_after),
        sum(|r| r.written),
        sum(|r| r.replaced),
        sum(|r| r.vacuumed)
    );
    Ok(ExitCode::SUCCESS)
}
