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

/// The ingest pod's mimalloc purge delay, in milliseconds, unless `MIMALLOC_PURGE_DELAY` sets
/// it.
///
/// mimalloc 3 returns freed memory to the kernel only after `purge_delay` times
/// `arena_purge_mult` (1,000 ms × 10 by default). The pod frees a batch's decoded changes on
/// the sinks' threads as fast as the poll thread allocates the next, so on a backlog about
/// 50-80 MB of freed pages waited there, counted in its RSS. A heap profile of a backlog found
/// the live heap at half the RSS peak. 30 ms (300 ms in the arenas) gives most of the rest
/// back with the lake alone within its spread; 10 ms gave back more but cost the lake alone
/// about 20% of its rate in page faults (docs/performance.md, "Freed memory back to the
/// kernel" and "The prefetch and the purge delay").
///
/// Commands that run once and end (`replay`, `verify`, `compact`, ...) keep mimalloc's default:
/// a replay faulted the same pages in again and again, 15-20% of its CPU (docs/performance.md,
/// "Replay: batches freed off the apply path").
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

/// How long a process runs, which decides how promptly it returns freed memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// The ingest pod: runs for good, so its RSS is what a container limit sees.
    Pod,
    /// A command that ends when its work is done.
    OneShot,
}

/// Sets [`PURGE_DELAY_MS`] for the pod before the first thread starts, unless the environment
/// chose one.
fn return_freed_memory_promptly(lifetime: Lifetime) {
    // The allocator the binaries install; naming it keeps mimalloc linked here too.
    let _allocator = mimalloc::MiMalloc;
    let chosen = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .any(|var| std::env::var_os(var).is_some());
    if lifetime == Lifetime::Pod && !chosen {
        // SAFETY: a plain setter of mimalloc's option table, called before other threads run.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

pub fn run<F, Fut>(
    program: &str,
    lifetime: Lifetime,
    config_path: Option<&Path>,
    command: F,
) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = Result<ExitCode, CommandError>>,
{
    return_freed_memory_promptly(lifetime);
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

    /// Runs test `name` of this binary again in a child process with `env` set (and the purge
    /// settings cleared otherwise): mimalloc reads its options once per process.
    fn in_child(name: &str, env: &[(&str, &str)]) {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env_remove("MIMALLOC_PURGE_DELAY")
            .env_remove("MIMALLOC_RESET_DELAY");
        for (k, v) in env {
            child.env(k, v);
        }
        let out = child.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the child test failed or did not run:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    const CHILD: &str = "CDC_LAKE_TEST_PURGE_DELAY_CHILD";

    fn purge_delay() -> std::ffi::c_long {
        let _allocator = mimalloc::MiMalloc;
        // SAFETY: a plain getter of mimalloc's option table.
        unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }
    }

    /// Option 15 is the purge delay: a child process started with `MIMALLOC_PURGE_DELAY` reads
    /// that value back from option 15. A mimalloc that renumbered its options would otherwise
    /// have the pod silently set another one.
    #[test]
    fn option_15_is_mimallocs_purge_delay() {
        if std::env::var_os(CHILD).is_some() {
            assert_eq!(purge_delay(), 4321);
            return;
        }
        in_child(
            "cli::tests::option_15_is_mimallocs_purge_delay",
            &[("MIMALLOC_PURGE_DELAY", "4321")],
        );
    }

    /// The pod returns freed memory within [`PURGE_DELAY_MS`]; a one-shot command keeps
    /// mimalloc's default; a delay from the environment wins over both.
    #[test]
    fn only_the_pod_shortens_the_purge_delay() {
        if std::env::var_os(CHILD).is_some() {
            let from_env = std::env::var("MIMALLOC_PURGE_DELAY").ok();
            let before = purge_delay();
            return_freed_memory_promptly(Lifetime::OneShot);
            assert_eq!(purge_delay(), before, "a one-shot command changed it");
            assert_ne!(before, PURGE_DELAY_MS, "mimalloc's default is the pod's");
            return_freed_memory_promptly(Lifetime::Pod);
            let want = from_env.map_or(PURGE_DELAY_MS, |v| v.parse().unwrap());
            assert_eq!(purge_delay(), want);
            return;
        }
        let name = "cli::tests::only_the_pod_shortens_the_purge_delay";
        in_child(name, &[]);
        in_child(name, &[("MIMALLOC_PURGE_DELAY", "77")]);
    }
}
