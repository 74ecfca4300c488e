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

/// mimalloc's purge delay, in milliseconds, unless `MIMALLOC_PURGE_DELAY` sets it.
///
/// mimalloc 3 returns freed memory to the kernel only after `purge_delay` times
/// `arena_purge_mult` (1,000 ms × 10 by default). The pod frees a batch's decoded changes on
/// the sinks' threads as fast as the poll thread allocates the next, so on a backlog about
/// 50-80 MB of freed pages waited there, counted in its RSS. A heap profile of a backlog found
/// the live heap at half the RSS peak. 30 ms (300 ms in the arenas) gives most of the rest
/// back with the lake alone within its spread; 10 ms gave back more but cost the lake alone
/// about 20% of its rate in page faults (docs/performance.md, "Freed memory back to the
/// kernel" and "The prefetch and the purge delay").
const PURGE_DELAY_MS: std::ffi::c_long = 30;

/// mimalloc.h: `mi_option_purge_delay` is option 15 in mimalloc 2 and 3. The crate declares
/// the option functions only behind a feature that pulls in another crate, so the index is
/// written here; a test checks it against the variable mimalloc reads for that option.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

/// Sets [`PURGE_DELAY_MS`] before the first thread starts, unless the environment chose one.
fn return_freed_memory_promptly() {
    // The allocator the binaries install; naming it keeps mimalloc linked here too.
    let _allocator = mimalloc::MiMalloc;
    let chosen = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .any(|var| std::env::var_os(var).is_some());
    if !chosen {
        // SAFETY: a plain setter of mimalloc's option table, called before other threads run.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

pub fn run<F, Fut>(program: &str, config_path: Option<&Path>, command: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = Result<ExitCode, CommandError>>,
{
    return_freed_memory_promptly();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Option 15 is the purge delay: a child process started with `MIMALLOC_PURGE_DELAY` reads
    /// that value back from option 15. A mimalloc that renumbered its options would otherwise
    /// have the pod silently set another one.
    #[test]
    fn option_15_is_mimallocs_purge_delay() {
        const CHILD: &str = "CDC_LAKE_TEST_PURGE_DELAY_CHILD";
        const NAME: &str = "cli::tests::option_15_is_mimallocs_purge_delay";
        if std::env::var_os(CHILD).is_some() {
            let _allocator = mimalloc::MiMalloc;
            // SAFETY: a plain getter of mimalloc's option table.
            assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, 4321);
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("MIMALLOC_PURGE_DELAY", "4321")
            .env_remove("MIMALLOC_RESET_DELAY")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the child test failed or did not run:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
