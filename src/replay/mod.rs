//! `cdc-replay`: rebuilds a current-state target from the raw log or the lake, with the same
//! apply code (and ordering guard) as the ingest pod, so a rebuilt target equals a live-built one.
//!
//! Also here: `verify` (recompute a target from the log and compare) and `prune-raw` (delete
//! raw-log rows the lake manifest proves are in the lake).

pub mod compare;
mod error;
mod progress;
pub mod prune;
mod reader;
mod rebuild;
pub mod route;
mod route_avro;
mod selection;
pub mod source;

use crate::config::Config;

pub use error::{Cause, Context, ReplayError, ReplayResult};
pub use progress::{Progress, Summary};
pub use reader::Reader;
pub use rebuild::{apply_plan, apply_selection, run, target_checkpoints, TargetLock};
pub use selection::{Selection, SourceKind, Until};

/// `cdc-replay` / `cdc-lake replay` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// First Kafka offset to replay (per partition).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub from_offset: i64,
    /// Last Kafka offset to replay (per partition), inclusive.
    #[arg(long, value_name = "M")]
    pub to_offset: Option<i64>,
    /// Only this topic.
    #[arg(long, value_name = "T")]
    pub topic: Option<String>,
    /// Only this partition.
    #[arg(long, value_name = "P")]
    pub partition: Option<i32>,
    /// Rebuild state as it was at this point: a timestamp (RFC 3339, UTC
    /// "YYYY-MM-DD HH:MM:SS", or a UTC date, meaning its midnight) or a source LSN (0/16B3748).
    #[arg(long, value_name = "TIMESTAMP|LSN")]
    pub until: Option<Until>,
    /// The target to write: "processed" ([state]), a [targets.<name>] from the config, or
    /// route:<filter id> to route the filter's history into its topic (docs/routing.md).
    #[arg(long, default_value = crate::config::PROCESSED_TARGET)]
    pub target: String,
    /// Read from the raw log or from the lake.
    #[arg(long, value_enum, default_value_t = SourceKind::Raw)]
    pub source: SourceKind,
    /// Empty the target's tables for the selected source tables first.
    #[arg(long)]
    pub rebuild: bool,
    /// Print what would change (per table: rows inserted, updated, deleted) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Changes per apply transaction.
    #[arg(long, default_value_t = 10_000)]
    pub batch_size: usize,
}

impl ReplayArgs {
    pub fn selection(&self) -> Selection {
        Selection {
            topic: self.topic.clone(),
            partition: self.partition,
            from_offset: self.from_offset,
            to_offset: self.to_offset,
            until: self.until,
        }
    }
}

/// `cdc-lake verify` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The target to check: "processed" or a [targets.<name>].
    #[arg(long, default_value = crate::config::PROCESSED_TARGET)]
    pub target: String,
    /// Recompute from the raw log or from the lake.
    #[arg(long, value_enum, default_value_t = SourceKind::Raw)]
    pub source: SourceKind,
    /// Also compare each mirror with its table in this source database
    /// (postgres://user@host:port/db; exact only while the source is quiet).
    #[arg(long, value_name = "URL")]
    pub source_db: Option<String>,
}

/// `cdc-lake prune-raw` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct PruneArgs {
    /// Delete rows whose source commit time is before this (RFC 3339, UTC
    /// "YYYY-MM-DD HH:MM:SS", or a UTC date "YYYY-MM-DD", which means its midnight).
    #[arg(long, value_name = "TIMESTAMP")]
    pub before: String,
    /// Count what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Runs `cdc-replay` and prints the summary (and a dry run's changes) on stdout.
pub async fn cli_replay(
    config: &Config,
    args: &ReplayArgs,
) -> ReplayResult<std::process::ExitCode> {
    if let Some(filter) = route::route_target(&args.target) {
        let summary = route::run(config, args, filter).await?;
        print!("{summary}");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let summary = run(config, args).await?;
    print!("{summary}");
    for d in &summary.changes {
        println!(
            "{}",
            compare::Described {
                diff: d,
                dry_run: true
            }
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs `cdc-lake verify`: exit 0 when the target matches, 1 with the differences otherwise.
pub async fn cli_verify(
    config: &Config,
    args: &VerifyArgs,
) -> ReplayResult<std::process::ExitCode> {
    let target = config.target(&args.target)?;
    let reader = Reader::open(config, args.source).await?;
    let diffs = compare::verify(config, &target, &reader).await?;
    let bad: Vec<_> = diffs.iter().filter(|d| !d.is_empty()).collect();
    for d in &bad {
        println!(
            "{}",
            compare::Described {
                diff: d,
                dry_run: false
            }
        );
    }
    let mut source_differs = false;
    if let Some(url) = &args.source_db {
        let tables = reader.plan(&Selection::default()).await?.tables;
        for (d, skipped) in compare::compare_with_source(&target, url, &tables).await? {
            if d.is_empty() {
                println!("{}: matches the source database", d.table);
            } else {
                source_differs = true;
                let described = compare::Described {
                    diff: &d,
                    dry_run: false,
                };
                println!("source database: {described}");
            }
            if !skipped.is_empty() {
                println!("  not compared: {}", skipped.join(", "));
            }
        }
    }
    if bad.is_empty() && !source_differs {
        println!(
            "target {:?}: {} table(s) match the {}",
            target.name,
            diffs.len(),
            args.source
        );
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        println!(
            "target {:?}: {} of {} table(s) differ from the {}{}",
            target.name,
            bad.len(),
            diffs.len(),
            args.source,
            if source_differs {
                "; the source database differs"
            } else {
                ""
            }
        );
        Ok(std::process::ExitCode::FAILURE)
    }
}

/// Runs `cdc-lake prune-raw`.
pub async fn cli_prune(config: &Config, args: &PruneArgs) -> ReplayResult<std::process::ExitCode> {
    let before = match args
        .before
        .parse::<Until>()
        .map_err(ReplayError::BadArguments)?
    {
        Until::Time(t) => t,
        Until::Lsn(_) => {
            return Err(ReplayError::BadArguments(
                "--before takes a time, not an LSN".into(),
            ))
        }
    };
    let report = prune::prune_raw(config, before, args.dry_run).await?;
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    for (tp, ((first, next), n)) in &report.partitions {
        println!("{tp}: lake holds offsets {first}..{next}; {verb} {n} raw rows");
    }
    for tp in &report.unproven {
        println!("{tp}: no lake manifest; kept every raw row");
    }
    println!(
        "{verb} {} raw rows older than {}",
        report.deleted(),
        before.to_rfc3339()
    );
    Ok(std::process::ExitCode::SUCCESS)
}
