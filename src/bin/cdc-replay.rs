//! `cdc-replay`: rebuild a current-state target from the raw log or the lake. The same command
//! as `cdc-lake replay`; see `docs/operations.md` (runbook) for recovery recipes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cdc-replay",
    version,
    about = "Rebuild a current-state target (cdc_processed mirrors, a replica) from the raw log or the lake",
    long_about = "Rebuild a current-state target from cdc-lake's raw log (cdc_raw.cdc_events) or its \
Parquet lake, with the same apply code and ordering guard as the ingest pod: replaying into a target \
the pod is also writing never moves a row backwards. Everything is validated before the first write; \
a target being replayed is locked against a second replay.\n\n\
Examples:\n  cdc-replay --from-offset 0 --rebuild                 rebuild cdc_processed from the raw log\n  \
cdc-replay --source lake --rebuild                   the same, from the lake (after prune-raw)\n  \
cdc-replay --target replica --rebuild --until '2026-11-21 09:30:00'   state as of that time\n  \
cdc-replay --topic ecom.public.orders --from-offset 5000 --dry-run   what would change"
)]
struct Cli {
    /// TOML config file. Without one, the embedded demo defaults are used.
    #[arg(long, short, env = "CDC_LAKE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    args: cdc_lake::replay::ReplayArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let lifetime = cdc_lake::cli::Lifetime::OneShot;
    cdc_lake::cli::run(
        "cdc-replay",
        lifetime,
        cli.config.as_deref(),
        |config| async move { Ok(cdc_lake::replay::cli_replay(&config, &cli.args).await?) },
    )
}
