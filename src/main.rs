//! The `cdc-lake` command line. Arguments become a validated config before any I/O; errors end
//! in one line a human can act on and a non-zero exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use cdc_lake::cli::{CommandError, Lifetime};
use cdc_lake::config::Config;

// The pipeline allocates many small JSON values per record; glibc malloc showed up as ~15% of
// CPU in the profile (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cdc-lake",
    version,
    about = "Debezium change events from Kafka into a PostgreSQL raw log, a Parquet lake and current-state mirrors",
    long_about = "Debezium change events from Kafka into a PostgreSQL raw log (cdc_raw.cdc_events), \
Hive-partitioned Parquet files (local directory or S3) and current-state mirrors (cdc_processed.<table>).\n\n\
Configuration: a TOML file (--config or CDC_LAKE_CONFIG), then CDC_LAKE__SECTION__KEY environment \
overrides, then secrets from *_file paths. Without a file, the embedded defaults target the dev \
stack from tools/up. See docs/configuration.md."
)]
struct Cli {
    /// TOML config file. Without one, the embedded demo defaults are used.
    #[arg(long, short, env = "CDC_LAKE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ingest pod: consume, write every sink, serve /healthz /readyz /metrics.
    Ingest {
        /// Do not apply pending SQL migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply the numbered SQL migrations in sql/ (idempotent; safe to run from several pods).
    Migrate,
    /// Validate the config and print it with secrets redacted.
    CheckConfig,
    /// Rebuild a current-state target from the raw log or the lake (same as `cdc-replay`).
    Replay(cdc_lake::replay::ReplayArgs),
    /// Recompute a target from the log up to its checkpoints and compare: prints differing keys,
    /// exits 1 on any difference.
    Verify(cdc_lake::replay::VerifyArgs),
    /// Delete raw-log rows older than a time that the lake manifest proves are in the lake.
    PruneRaw(cdc_lake::replay::PruneArgs),
    /// Records no sink could take: counts per reason, a listing, and reprocessing.
    Rejects {
        #[command(subcommand)]
        action: cdc_lake::rejects::RejectsAction,
    },
    /// Filter definitions for routing to consumer topics (routes.yaml): check, test against
    /// a sample, print as Flink SQL. See docs/routing.md.
    Routes {
        #[command(subcommand)]
        action: cdc_lake::route::cli::RoutesAction,
    },
    /// Lake maintenance.
    Lake {
        #[command(subcommand)]
        action: LakeAction,
    },
}

#[derive(Subcommand)]
enum LakeAction {
    /// Merge each table's small files (per date and topic-partition, consecutive offsets) into
    /// files of about --target-size, swap them in the manifest and the Delta logs, and delete
    /// files replaced longer ago than the retention. Safe to kill at any point: the next run
    /// finishes or undoes what the last one left. One compaction per lake at a time.
    Compact(cdc_lake::compact::CompactArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let lifetime = match cli.command {
        Command::Ingest { .. } => Lifetime::Pod,
        _ => Lifetime::OneShot,
    };
    cdc_lake::cli::run("cdc-lake", lifetime, cli.config.as_deref(), |config| {
        run(cli.command, config)
    })
}

async fn run(command: Command, config: Config) -> Result<ExitCode, CommandError> {
    use cdc_lake::replay;
    match command {
        Command::Replay(args) => Ok(replay::cli_replay(&config, &args).await?),
        Command::Verify(args) => Ok(replay::cli_verify(&config, &args).await?),
        Command::PruneRaw(args) => Ok(replay::cli_prune(&config, &args).await?),
        Command::Rejects { action } => Ok(cdc_lake::rejects::cli(&config, &action).await?),
        Command::Routes { action } => Ok(cdc_lake::route::cli::cli(&config, &action)?),
        Command::Lake {
            action: LakeAction::Compact(args),
        } => Ok(cdc_lake::compact::cli_compact(&config, &args).await?),
        Command::CheckConfig => {
            print!("{}", config.redacted());
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let applied = cdc_lake::ingest::migrate(&config).await?;
            println!(
                "migrations applied: {applied:?} (all {} present)",
                cdc_lake::db::MIGRATIONS.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ingest { no_migrate } => {
            let shutdown = CancellationToken::new();
            {
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    cdc_lake::ingest::termination_signal().await;
                    shutdown.cancel();
                });
            }
            cdc_lake::ingest::run(config, shutdown, no_migrate).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
