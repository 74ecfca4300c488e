//! Logs, metrics and readiness. Metric names live here as constants; labels stay low-cardinality (sink,
//! reason class, topic-partition). Row values are never logged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use prometheus::{
    register_histogram_vec_with_registry, register_int_counter_vec_with_registry,
    register_int_counter_with_registry, register_int_gauge_vec_with_registry,
    register_int_gauge_with_registry, Encoder, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounterVec,
    pub fetch_pauses: IntCounter,
    pub written: IntCounterVec,
    pub skipped: IntCounterVec,
    pub rejected: IntCounterVec,
    pub batch_seconds: HistogramVec,
    pub sink_errors: IntCounterVec,
    pub lag: IntGaugeVec,
    pub committed: IntGaugeVec,
    pub ready: IntGauge,
    /// Partitions this pod owns (set once their start offsets are known).
    pub assigned: IntGauge,
    /// Per sink: records handed to its lane and not yet written (the sink is this far behind
    /// the pipeline; the lane holds at most two full batches).
    pub queued: IntGaugeVec,
    pub compaction_runs: IntCounterVec,
    pub compaction_files: IntCounterVec,
    /// Per filter id: changes its condition held for, records acknowledged in its topic, and
    /// changes it could not be evaluated on (rejected at the route stage).
    pub route_matched: IntCounterVec,
    pub route_routed: IntCounterVec,
    pub route_errors: IntCounterVec,
    /// Partitions found with a sink checkpoint past the log's end (the log started over), per
    /// sink and outcome: `rebased` (taken up from the new log's start) or `kept` (this sink
    /// cannot; the new log's records below its checkpoint are not stored by it).
    pub log_resets: IntCounterVec,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    Metrics {
        consumed: register_int_counter_vec_with_registry!(
            "cdc_lake_records_consumed_total",
            "Kafka records received, per topic",
            &["topic"],
            r
        )
        .expect("metric registers"),
        fetch_pauses: register_int_counter_with_registry!(
            "cdc_lake_fetch_pauses_total",
            "Times fetching was paused: the pipeline took no records for a second (a slow or \
             failing sink), or records wait for the schema registry; each pause drops \
             librdkafka's prefetched records, which are fetched again on resume",
            r
        )
        .expect("metric registers"),
        written: register_int_counter_vec_with_registry!(
            "cdc_lake_records_written_total",
            "Records durably written, per sink",
            &["sink"],
            r
        )
        .expect("metric registers"),
        log_resets: register_int_counter_vec_with_registry!(
            "cdc_lake_log_resets_total",
            "Partitions whose log started over below a sink's checkpoint, per sink and outcome (rebased, kept)",
            &["sink", "outcome"],
            r
        )
        .expect("metric registers"),
        skipped: register_int_counter_vec_with_registry!(
            "cdc_lake_records_skipped_total",
            "Records intentionally not stored (tombstones, heartbeats, ...), per sink and reason",
            &["sink", "reason"],
            r
        )
        .expect("metric registers"),
        rejected: register_int_counter_vec_with_registry!(
            "cdc_lake_records_rejected_total",
            "Records sent to cdc_raw.cdc_rejects at decode time, per reason class",
            &["reason"],
            r
        )
        .expect("metric registers"),
        batch_seconds: register_histogram_vec_with_registry!(
            "cdc_lake_batch_duration_seconds",
            "Time for a sink to make one batch durable",
            &["sink"],
            vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            r
        )
        .expect("metric registers"),
        route_matched: register_int_counter_vec_with_registry!(
            "cdc_lake_route_matched_total",
            "Changes a filter's condition held for (at or after the route checkpoint), per filter",
            &["filter"],
            r
        )
        .expect("metric registers"),
        route_routed: register_int_counter_vec_with_registry!(
            "cdc_lake_route_routed_total",
            "Records acknowledged in a filter's output topic, per filter",
            &["filter"],
            r
        )
        .expect("metric registers"),
        route_errors: register_int_counter_vec_with_registry!(
            "cdc_lake_route_errors_total",
            "Changes a filter could not be evaluated on (type mismatch, unknown column), sent to \
             cdc_raw.cdc_rejects with stage route:<filter>, per filter",
            &["filter"],
            r
        )
        .expect("metric registers"),
        sink_errors: register_int_counter_vec_with_registry!(
            "cdc_lake_sink_errors_total",
            "Failed sink writes (retried with backoff), per sink",
            &["sink"],
            r
        )
        .expect("metric registers"),
        lag: register_int_gauge_vec_with_registry!(
            "cdc_lake_consumer_lag",
            "Records between the high watermark and the consumer position, per partition",
            &["topic", "partition"],
            r
        )
        .expect("metric registers"),
        committed: register_int_gauge_vec_with_registry!(
            "cdc_lake_committed_offset",
            "Offset committed to Kafka (the lowest durable sink checkpoint), per partition",
            &["topic", "partition"],
            r
        )
        .expect("metric registers"),
        assigned: register_int_gauge_with_registry!(
            "cdc_lake_assigned_partitions",
            "Partitions this pod owns, counted once their start offsets are known",
            r
        )
        .expect("metric registers"),
        queued: register_int_gauge_vec_with_registry!(
            "cdc_lake_sink_queued_records",
            "Records handed to a sink and not yet written by it, per sink: how far it is behind \
             the others (at most two batches: 2 x batch.max_records and 2 x batch.max_bytes \
             of decoded changes; at that bound the pipeline waits for it)",
            &["sink"],
            r
        )
        .expect("metric registers"),
        ready: register_int_gauge_with_registry!(
            "cdc_lake_ready",
            "1 while every sink is reachable and the consumer is running",
            r
        )
        .expect("metric registers"),
        compaction_runs: register_int_counter_vec_with_registry!(
            "cdc_lake_compaction_runs_total",
            "In-pod lake compaction runs ([lake.compaction] every), per outcome: ok, busy \
             (another compactor held the lease), failed, stopped (shutdown)",
            &["outcome"],
            r
        )
        .expect("metric registers"),
        compaction_files: register_int_counter_vec_with_registry!(
            "cdc_lake_compaction_files_total",
            "Lake files handled by in-pod compaction, per action: replaced (merged into \
             compacted files), written (compacted files), vacuumed (deleted after the retention)",
            &["action"],
            r
        )
        .expect("metric registers"),
        registry: r,
    }
});

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}

/// Logs to stderr; `RUST_LOG` filters (default `info`), `CDC_LAKE_LOG_FORMAT=json` for JSON lines.
/// Colours only on a terminal, and not with `NO_COLOR`: a log collected from a pod or written
/// to a file stays plain text that grep and log shippers read.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::new(log_directives(
        std::env::var("RUST_LOG").ok().as_deref(),
    ));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if std::env::var("CDC_LAKE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The log filter: `RUST_LOG` (default `info`), with tokio_postgres capped at `info` unless
/// `RUST_LOG` names it itself. At debug level tokio_postgres logs every statement's parameters,
/// which are row values (a reject's bytes); those must never reach the logs by accident.
fn log_directives(rust_log: Option<&str>) -> String {
    let base = rust_log
        .filter(|s| !s.trim().is_empty())
        // deltalake logs every commit at info; the lake's own debug line says the same.
        .unwrap_or("info,rdkafka=warn,tokio_postgres=warn,deltalake_core=warn");
    if base.contains("tokio_postgres") {
        base.to_string()
    } else {
        format!("{base},tokio_postgres=info")
    }
}

/// Readiness as `/readyz` reports it: the consumer runs, every sink's last attempt worked, and
/// the source can decode what it reads (the Schema Registry answers). The pipeline and the
/// source thread each own one part, so neither can report ready over the other's fault.
#[derive(Clone)]
pub struct Readiness(Arc<ReadinessParts>);

struct ReadinessParts {
    sinks: Part,
    source: Part,
}

/// One part of readiness, with why it last turned not-ready.
struct Part {
    ready: AtomicBool,
    why: std::sync::Mutex<String>,
}

impl Part {
    fn new(ready: bool, why: &str) -> Self {
        Part {
            ready: AtomicBool::new(ready),
            why: std::sync::Mutex::new(why.to_string()),
        }
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(ReadinessParts {
            sinks: Part::new(false, "starting"),
            source: Part::new(true, ""),
        }))
    }
}

impl Readiness {
    /// The pipeline's part: the consumer runs and the sinks accept batches.
    pub fn set(&self, ready: bool, why: &str) {
        self.update(&self.0.sinks, ready, why);
    }

    /// The source thread's part: records can be decoded (their writer schemas can be fetched).
    pub fn set_source(&self, ready: bool, why: &str) {
        self.update(&self.0.source, ready, why);
    }

    fn update(&self, part: &Part, ready: bool, why: &str) {
        if part.ready.swap(ready, Ordering::SeqCst) == ready {
            return;
        }
        if !ready {
            if let Ok(mut w) = part.why.lock() {
                *w = why.to_string();
            }
        }
        let now = self.get();
        METRICS.ready.set(i64::from(now));
        match (ready, now) {
            (false, _) => tracing::warn!(reason = why, "not ready"),
            (true, true) => tracing::info!(reason = why, "ready"),
            (true, false) => tracing::info!(reason = why, "recovered; still not ready"),
        }
    }

    pub fn get(&self) -> bool {
        self.0.sinks.ready.load(Ordering::SeqCst) && self.0.source.ready.load(Ordering::SeqCst)
    }

    /// Why it is not ready (empty when ready): each part's reason, as `/readyz` shows them.
    pub fn reasons(&self) -> Vec<String> {
        [&self.0.sinks, &self.0.source]
            .into_iter()
            .filter(|p| !p.ready.load(Ordering::SeqCst))
            .map(|p| p.why.lock().map(|w| w.clone()).unwrap_or_default())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_parameters_stay_out_of_debug_logs_unless_asked_for() {
        assert_eq!(log_directives(Some("debug")), "debug,tokio_postgres=info");
        assert_eq!(
            log_directives(Some("debug,tokio_postgres=trace")),
            "debug,tokio_postgres=trace"
        );
        assert_eq!(
            log_directives(None),
            "info,rdkafka=warn,tokio_postgres=warn,deltalake_core=warn"
        );
    }
}
