//! What every binary does around its command: load the config before any I/O, start the
//! runtime, and end in one line a human can act on with a meaningful exit code (2: the config or
//! arguments are wrong, 1: the command failed).

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// A command's arguments are wrong (checked before any I/O): the binary exits 2, as for a bad
/// config, rather than 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadArguments(pub String);

/// `Err` of a [`BadArguments`] with `message`.
pub fn bad_arguments<T>(message: impl Into<String>) -> anyhow::Result<T> {
    Err(BadArguments(message.into()).into())
}

/// The async runtime every binary runs on. Its threads have stacks deep enough for JSON
/// documents as deep as jsonb takes ([`crate::envelope::json`]).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(crate::envelope::json::THREAD_STACK_BYTES)
        .build()
}

pub fn run<F, Fut>(program: &str, config_path: Option<&Path>, command: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    crate::telemetry::init_logging();
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command(config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            if e.downcast_ref::<BadArguments>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
