//! What every binary does around its command: load the config before any I/O, start the
//! runtime, and end in one line a human can act on with a meaningful exit code (2: the config or
//! arguments are wrong, 1: the command failed).

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

use crate::compact::CompactError;
use crate::ingest::IngestError;
use crate::rejects::RejectsError;
use crate::replay::ReplayError;
use crate::route::cli::RoutesCliError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Rejects(#[from] RejectsError),
    #[error(transparent)]
    Compact(#[from] CompactError),
    #[error(transparent)]
    Routes(#[from] RoutesCliError),
}

impl CommandError {
    /// 2 when the arguments are wrong (checked before any I/O, as a bad config is), else 1.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CommandError::Replay(ReplayError::BadArguments(_))
            | CommandError::Rejects(RejectsError::BadArguments(_))
            | CommandError::Compact(CompactError::BadArguments(_))
            | CommandError::Routes(RoutesCliError::BadArguments(_)) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

/// An error and each of its sources, on one line (`reading X: db error: …`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
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
    Fut: Future<Output = Result<ExitCode, CommandError>>,
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
            eprintln!("{program}: {}", error_chain(&e));
            e.exit_code()
        }
    }
}
