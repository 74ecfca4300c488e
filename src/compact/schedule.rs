//! The in-pod compaction policy: with `[lake.compaction] every`, the pod runs what
//! `cdc-lake lake compact` runs with the config's defaults, once at start-up and then `every`
//! after each run ends. It runs beside ingest and never blocks it: the lake sink only adds
//! files, and a compaction only replaces files every reader has (see [`super::plan`]).
//!
//! At shutdown a run stops before its next partition and releases the lease; a run cut short
//! (the deadline passed, or a crash) is finished or undone by the next one, as with a killed
//! `lake compact`.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{compact, CompactArgs, CompactError, Options};
use crate::config::Config;
use crate::telemetry::METRICS;

/// Starts the policy when the config asks for it; `stop` ends it.
pub fn spawn(config: &Config, stop: &CancellationToken) -> Option<JoinHandle<()>> {
    let every = config.lake.compaction.every?.0;
    if !config.lake.enabled {
        return None;
    }
    tracing::info!(
        every_s = every.as_secs_f64(),
        include_today = config.lake.compaction.include_today,
        "in-pod lake compaction on"
    );
    // Every outcome and action at zero from the start (see `run_once`'s labels).
    for outcome in ["ok", "busy", "failed"] {
        METRICS.compaction_runs.with_label_values(&[outcome]);
    }
    for action in ["replaced", "written", "vacuumed"] {
        METRICS.compaction_files.with_label_values(&[action]);
    }
    let (config, stop) = (config.clone(), stop.clone());
    Some(tokio::spawn(async move {
        loop {
            let outcome = run_once(&config, &stop).await;
            METRICS.compaction_runs.with_label_values(&[outcome]).inc();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }))
}

/// Waits up to `limit` for the policy to stop (after `stop` was cancelled), then aborts it.
pub async fn finish(task: JoinHandle<()>, limit: Duration) {
    let abort = task.abort_handle();
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the in-pod compaction task ended abnormally"),
        Err(_) => {
            abort.abort();
            tracing::warn!(
                limit_s = limit.as_secs_f64(),
                "a compaction was still merging at shutdown and was cut short; the next run \
                 finishes or undoes what it left"
            );
        }
    }
}

/// `--before` for a run on `today`: tomorrow when today's date is included, else the default
/// (today, exclusive).
fn before(include_today: bool, today: chrono::NaiveDate) -> Option<String> {
    include_today.then(|| {
        (today + chrono::Days::new(1))
            .format("%Y-%m-%d")
            .to_string()
    })
}

/// One run, as `lake compact` with the config's defaults; returns its outcome label.
async fn run_once(config: &Config, stop: &CancellationToken) -> &'static str {
    let args = CompactArgs {
        table: None,
        // Per run: a pod runs across midnight.
        before: before(
            config.lake.compaction.include_today,
            chrono::Utc::now().date_naive(),
        ),
        target_size: None,
        retention: None,
        dry_run: false,
    };
    let options = match Options::from_args(config, &args) {
        Ok(options) => Options {
            stop: stop.clone(),
            ..options
        },
        Err(e) => {
            tracing::error!(error = %e, "in-pod compaction is misconfigured");
            return "failed";
        }
    };
    let count = |action: &str, n: usize| {
        METRICS
            .compaction_files
            .with_label_values(&[action])
            .inc_by(n as u64)
    };
    let result = compact(config, &options, |r| {
        count("replaced", r.replaced);
        count("written", r.written);
        count("vacuumed", r.vacuumed);
    })
    .await;
    match result {
        Ok(_) if stop.is_cancelled() => "stopped",
        Ok(reports) => {
            let sum =
                |f: fn(&super::PartitionReport) -> usize| reports.iter().map(f).sum::<usize>();
            if sum(|r| r.written + r.vacuumed) > 0 {
                tracing::info!(
                    partitions = reports.len(),
                    files_before = sum(|r| r.files_before),
                    files_after = sum(|r| r.files_after),
                    replaced = sum(|r| r.replaced),
                    vacuumed = sum(|r| r.vacuumed),
                    "compacted the lake"
                );
            }
            "ok"
        }
        Err(CompactError::Busy(reason)) => {
            tracing::info!(%reason, "skipping this compaction run: another compactor runs");
            "busy"
        }
        Err(e) => {
            tracing::warn!(error = %e, "in-pod compaction failed; the next run finishes or undoes what it left");
            "failed"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn today_is_included_by_compacting_before_tomorrow() {
        let new_year_eve = chrono::NaiveDate::from_ymd_opt(2026, 12, 31).unwrap();
        assert_eq!(before(true, new_year_eve).as_deref(), Some("2027-01-01"));
        assert_eq!(
            before(false, new_year_eve),
            None,
            "lake compact's default: today"
        );
    }
}
