//! The run loop: receive decoded records, batch them, hand each batch to every sink's lane
//! (`lanes`), and commit to Kafka the lowest offset that every sink holds durably.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, Batcher};
use crate::config::BatchConfig;
use crate::domain::{LogBounds, TopicPartition};
use crate::envelope::Decoded;
pub use crate::sink::AnySink;
use crate::sink::{ErrorClass, Offsets, Sink, SinkError};
use crate::source::SourceEvent;
pub use crate::telemetry::Readiness;
use crate::telemetry::METRICS;

mod kafka;
mod lanes;
mod log_reset;

use lanes::{Job, LaneContext, Lanes, Report};

pub use kafka::KafkaBroker;

/// How often the run loop logs a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// Exponential backoff with full jitter, capped.
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            attempt: 0,
            base,
            cap,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap);
        self.attempt += 1;
        // Jitter from the clock's low bits: good enough to de-synchronise pods.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let frac = f64::from(nanos % 1000) / 1000.0;
        exp.mul_f64(0.5 + frac / 2.0)
    }
}

/// Where Kafka commits go, and what the broker says of a partition's log. A trait so unit
/// tests can run the loop without a broker; [`KafkaBroker`] is the real one.
pub trait Committer: Send {
    fn commit(&self, offsets: &Offsets, sync: bool);

    /// For each partition asked, with the highest checkpoint any sink holds for it: its log's
    /// bounds, with `end` no lower than what the log is seen to hold (see `log_reset`).
    /// Partitions the broker does not answer for are left out.
    fn log_bounds(&self, highest: &[(TopicPartition, i64)]) -> HashMap<TopicPartition, LogBounds> {
        let _ = highest;
        HashMap::new()
    }
}

pub struct Pipeline<C: Committer> {
    /// The sinks while no lane runs (at start, and while partitions are assigned or revoked);
    /// empty while `lanes` holds them.
    sinks: Vec<AnySink>,
    lanes: Option<Lanes>,
    names: Vec<&'static str>,
    /// Every lane's reports arrive here; the pipeline keeps a sender so it never closes.
    reports: mpsc::UnboundedReceiver<Report>,
    lane_context: LaneContext,
    /// Per sink: it is retrying a failed job (the pod is not ready meanwhile).
    retrying: Vec<Arc<AtomicBool>>,
    /// Per sink: a flush is queued on its lane and has not reported yet.
    flush_queued: Vec<bool>,
    committer: C,
    batcher: Batcher,
    owned: HashSet<TopicPartition>,
    /// Per sink, per partition: the next offset that sink holds durably.
    durable: Vec<HashMap<TopicPartition, i64>>,
    committed: HashMap<TopicPartition, i64>,
    readiness: Readiness,
    shutdown: CancellationToken,
    /// How often buffered sinks (the lake) are asked to flush what is due.
    flush_every: Duration,
    /// Records rejected at decode time since start.
    rejected: u64,
    /// Per sink: it could not take a batch before shutdown. It gets no later batch (its
    /// checkpoint stays where its data ends) and the run ends with an error.
    failing: Vec<bool>,
}

/// How a run ended when some sink did not finish: each such sink with the checkpoint it holds
/// per partition (where it resumes after a restart).
#[derive(Debug, thiserror::Error)]
#[error("stopped with failing sinks: {}", describe_failing(.0))]
pub struct UnfinishedSinks(pub Vec<(&'static str, Offsets)>);

fn describe_failing(sinks: &[(&'static str, Offsets)]) -> String {
    sinks
        .iter()
        .map(|(name, held)| {
            let mut at: Vec<String> = held.iter().map(|(tp, o)| format!("{tp} at {o}")).collect();
            at.sort();
            format!("{name} ({})", at.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl<C: Committer> Pipeline<C> {
    pub fn new(
        sinks: Vec<AnySink>,
        committer: C,
        batch: BatchConfig,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> Self {
        let n = sinks.len();
        // Each sink's counters exist from the start, at zero: a rate or an alert on them reads
        // 0, not "no data", until the first record or error.
        for sink in &sinks {
            METRICS.written.with_label_values(&[sink.name()]);
            METRICS.queued.with_label_values(&[sink.name()]);
            METRICS.sink_errors.with_label_values(&[sink.name()]);
            for outcome in ["rebased", "kept"] {
                METRICS
                    .log_resets
                    .with_label_values(&[sink.name(), outcome]);
            }
        }
        let (report_to, reports) = mpsc::unbounded_channel();
        Self {
            names: sinks.iter().map(Sink::name).collect(),
            sinks,
            lanes: None,
            reports,
            lane_context: LaneContext {
                reports: report_to,
                readiness: readiness.clone(),
                shutdown: shutdown.clone(),
            },
            retrying: (0..n).map(|_| Arc::new(AtomicBool::new(false))).collect(),
            flush_queued: vec![false; n],
            committer,
            batcher: Batcher::new(batch),
            owned: HashSet::new(),
            durable: vec![HashMap::new(); n],
            committed: HashMap::new(),
            readiness,
            shutdown,
            flush_every: Duration::from_millis(500),
            rejected: 0,
            failing: vec![false; n],
        }
    }

    /// Runs until shutdown is requested or the source ends, then drains: writes the open
    /// batch, flushes buffered sinks and commits, within `deadline`. A sink that was failing
    /// when shutdown came keeps its checkpoint where its data ends, gets nothing more, and the
    /// run returns it as an error (the pod exits non-zero).
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        deadline: Duration,
    ) -> Result<(), UnfinishedSinks> {
        let mut last_flush = Instant::now();
        let mut last_progress = Instant::now();
        loop {
            let wait = self
                .batcher
                .time_left()
                .unwrap_or(self.flush_every)
                .min(self.flush_every.saturating_sub(last_flush.elapsed()));
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                // Before records: a report can let the commit advance, and there are at most a
                // few per batch, so records are not starved.
                Some(report) = self.reports.recv() => self.absorb(report),
                ev = events.recv() => match ev {
                    None => break,
                    Some(SourceEvent::Records(records)) => {
                        // A batch closes inside a chunk at its limits, so `batch.max_records`
                        // and `batch.max_bytes` hold whatever the chunk's size.
                        for r in records {
                            if self.owned.contains(&r.coords().topic_partition()) {
                                self.batcher.push(r);
                            }
                            if self.batcher.is_full() {
                                self.write_batch().await;
                            }
                        }
                    }
                    Some(SourceEvent::Assigned { partitions, reply }) => {
                        self.write_batch().await;
                        // The start checks read and may move the sinks' checkpoints: every
                        // lane finishes what it holds first.
                        self.park_lanes().await;
                        let starts = self.start_offsets(&partitions).await;
                        for tp in &partitions {
                            // Absent: the consumer starts at the partition's beginning.
                            self.batcher.assign(tp.clone(), starts.get(tp).copied().unwrap_or(0));
                        }
                        self.owned.extend(partitions);
                        METRICS.assigned.set(self.owned.len() as i64);
                        let _ = reply.send(starts);
                    }
                    Some(SourceEvent::Revoked { partitions, done }) => {
                        self.release(&partitions).await;
                        let _ = done.send(());
                    }
                },
                _ = tokio::time::sleep(wait) => {}
            }
            if self.batcher.time_left() == Some(Duration::ZERO) {
                self.write_batch().await;
            }
            if last_flush.elapsed() >= self.flush_every {
                self.flush_due();
                last_flush = Instant::now();
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                self.log_progress();
                last_progress = Instant::now();
            }
        }
        // Drain: what is batched gets written, what is buffered gets flushed and committed.
        let drain = async {
            // Records already handed over by the source are ours to finish.
            while let Ok(SourceEvent::Records(records)) = events.try_recv() {
                for r in records {
                    if self.owned.contains(&r.coords().topic_partition()) {
                        self.batcher.push(r);
                    }
                }
            }
            self.write_batch().await;
            self.lanes().send_all(|| Job::Flush { force: true }).await;
            self.park_lanes().await;
        };
        if tokio::time::timeout(deadline, drain).await.is_err() {
            tracing::error!(
                ?deadline,
                "drain did not finish in time; uncommitted records will be re-read on restart"
            );
            // What did finish still counts.
            while let Ok(report) = self.reports.try_recv() {
                self.absorb(report);
            }
        }
        self.commit(true);
        let unfinished: Vec<(&'static str, Offsets)> = (0..self.names.len())
            .filter(|i| self.failing[*i])
            .map(|i| {
                // Where the sink resumes: its stored checkpoint (0: none stored yet).
                let held: Offsets = self
                    .owned
                    .iter()
                    .map(|tp| (tp.clone(), self.durable[i].get(tp).copied().unwrap_or(0)))
                    .collect();
                (self.names[i], held)
            })
            .collect();
        for (name, held) in &unfinished {
            for (tp, offset) in held {
                tracing::error!(sink = name, %tp, offset, "sink failed before shutdown; its checkpoint stays here and it resumes from it on restart");
            }
        }
        tracing::info!("pipeline stopped");
        if unfinished.is_empty() {
            Ok(())
        } else {
            Err(UnfinishedSinks(unfinished))
        }
    }

    /// One line for operators tailing the log: totals per sink since start.
    fn log_progress(&self) {
        let written: Vec<String> = self
            .names
            .iter()
            .map(|name| {
                format!(
                    "{name}={}",
                    METRICS.written.with_label_values(&[name]).get()
                )
            })
            .collect();
        tracing::info!(
            written = %written.join(" "),
            rejected = self.rejected,
            partitions = self.owned.len(),
            ready = self.readiness.get(),
            "progress"
        );
    }

    /// Where to start each partition: the lowest checkpoint over all sinks; the beginning when
    /// some sink has none.
    async fn start_offsets(&mut self, partitions: &[TopicPartition]) -> Offsets {
        let mut per_sink = Vec::with_capacity(self.sinks.len());
        for sink in self.sinks.iter_mut() {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
            let cps = loop {
                match sink.checkpoints(partitions).await {
                    Ok(cps) => break cps,
                    Err(e) => {
                        if !on_error(
                            sink.name(),
                            &e,
                            &mut backoff,
                            &self.readiness,
                            &self.shutdown,
                        )
                        .await
                        {
                            return Offsets::new();
                        }
                    }
                }
            };
            per_sink.push(cps);
        }
        self.take_up_logs_that_started_over(&mut per_sink).await;
        for (durable, cps) in self.durable.iter_mut().zip(&per_sink) {
            durable.extend(cps.iter().map(|(k, v)| (k.clone(), *v)));
        }
        partitions
            .iter()
            .filter_map(|tp| {
                let lowest = per_sink
                    .iter()
                    .map(|cps| cps.get(tp).copied())
                    .collect::<Option<Vec<i64>>>()?;
                lowest.into_iter().min().map(|m| (tp.clone(), m))
            })
            .inspect(|(tp, o)| tracing::info!(%tp, offset = o, "resuming from sink checkpoint"))
            .collect()
    }

    /// Finishes work for revoked partitions, commits them, and forgets them.
    async fn release(&mut self, partitions: &[TopicPartition]) {
        self.write_batch().await;
        self.park_lanes().await;
        let commit: Offsets = self
            .commit_candidates()
            .into_iter()
            .filter(|(tp, _)| partitions.contains(tp))
            .collect();
        self.committer.commit(&commit, true);
        for s in &mut self.sinks {
            s.revoke(partitions);
        }
        for tp in partitions {
            self.owned.remove(tp);
            self.committed.remove(tp);
            for d in &mut self.durable {
                d.remove(tp);
            }
        }
        METRICS.assigned.set(self.owned.len() as i64);
        self.batcher
            .retain_partitions(|tp| !partitions.contains(tp));
    }

    /// Hands the open batch to every sink's lane. It waits only while some lane is
    /// [`lanes::LANE_BATCHES`] full batches behind: the sinks write concurrently, each at its
    /// own pace, and report back through `reports`.
    async fn write_batch(&mut self) {
        if self.batcher.is_empty() {
            return;
        }
        let batch = Arc::new(self.batcher.take());
        self.rejected += count_decode_outcomes(&batch);
        self.lanes().send_all(|| Job::Write(batch.clone())).await;
    }

    /// The running lanes, started from the parked sinks if none run.
    fn lanes(&mut self) -> &Lanes {
        if self.lanes.is_none() {
            let sinks = std::mem::take(&mut self.sinks);
            let lanes = Lanes::start(
                sinks,
                &self.failing,
                &self.retrying,
                (self.batcher.max_records(), self.batcher.max_bytes()),
                &self.lane_context,
            );
            self.lanes = Some(lanes);
        }
        self.lanes.as_ref().expect("started above")
    }

    /// Waits until every lane has finished the jobs it holds, absorbs their reports and takes the
    /// sinks back.
    async fn park_lanes(&mut self) {
        let Some(lanes) = self.lanes.take() else {
            return;
        };
        let parked = lanes.stop().await;
        while let Ok(report) = self.reports.try_recv() {
            self.absorb(report);
        }
        for (i, (sink, failing)) in parked.into_iter().enumerate() {
            self.failing[i] |= failing;
            self.sinks.push(sink);
        }
    }

    /// Asks buffering sinks to make due data durable: a flush goes on each lane that has none
    /// queued (a lane that is behind would otherwise gather flushes).
    fn flush_due(&mut self) {
        for i in 0..self.names.len() {
            if self.flush_queued[i] || self.failing[i] {
                continue;
            }
            self.lanes().flush(i);
            self.flush_queued[i] = true;
        }
    }

    fn absorb(&mut self, report: Report) {
        let Report {
            sink: i,
            ack,
            was_flush,
        } = report;
        if was_flush {
            self.flush_queued[i] = false;
        }
        let Some(ack) = ack else {
            // Only shutdown ends a sink's retries without an ack.
            self.failing[i] = true;
            return;
        };
        let name = self.names[i];
        METRICS
            .written
            .with_label_values(&[name])
            .inc_by(ack.stats.written);
        for (reason, n) in &ack.stats.ignored {
            METRICS
                .skipped
                .with_label_values(&[name, reason])
                .inc_by(*n);
        }
        for (tp, o) in ack.durable {
            if self.owned.contains(&tp) {
                let d = self.durable[i].entry(tp).or_insert(o);
                *d = (*d).max(o);
            }
        }
        let retrying = self.retrying.iter().any(|r| r.load(Ordering::Acquire));
        if !retrying && !self.failing.iter().any(|f| *f) {
            self.readiness.set(true, "every sink is taking batches");
        }
        self.commit(false);
    }

    /// Offsets that every sink holds durably and that are ahead of the last commit.
    fn commit_candidates(&self) -> Offsets {
        self.owned
            .iter()
            .filter_map(|tp| {
                let lowest = self
                    .durable
                    .iter()
                    .map(|d| d.get(tp).copied())
                    .collect::<Option<Vec<i64>>>()?
                    .into_iter()
                    .min()?;
                (self.committed.get(tp).is_none_or(|c| lowest > *c)).then(|| (tp.clone(), lowest))
            })
            .collect()
    }

    fn commit(&mut self, sync: bool) {
        let offsets = self.commit_candidates();
        if offsets.is_empty() {
            return;
        }
        self.committer.commit(&offsets, sync);
        for (tp, o) in offsets {
            METRICS
                .committed
                .with_label_values(&[tp.topic.as_str(), &tp.partition.to_string()])
                .set(o);
            self.committed.insert(tp, o);
        }
    }
}

/// Counts decode rejects and skips once per batch (not once per sink); returns the rejects.
fn count_decode_outcomes(batch: &Batch) -> u64 {
    let mut rejected = 0;
    for r in &batch.records {
        match r {
            Decoded::Reject(rej) => {
                METRICS.rejected.with_label_values(&[rej.kind]).inc();
                rejected += 1;
            }
            Decoded::Skip(_, reason) => METRICS
                .skipped
                .with_label_values(&["decode", reason.as_str()])
                .inc(),
            Decoded::Change(_) => {}
        }
    }
    rejected
}

/// Records a failed attempt and waits before the next. Returns false when shutdown was
/// requested instead. Records are never skipped on error: a sink that cannot write holds the
/// pipeline back rather than losing data.
async fn on_error(
    name: &'static str,
    e: &SinkError,
    backoff: &mut Backoff,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> bool {
    METRICS.sink_errors.with_label_values(&[name]).inc();
    readiness.set(false, &format!("{name}: {e}"));
    let delay = backoff.next_delay();
    match e.class() {
        ErrorClass::Transient => {
            tracing::warn!(sink = name, error = %e, retry_in = ?delay, "sink unavailable, retrying")
        }
        // Sinks narrow bad data down to records and reject those; one that reaches here could
        // not be pinned to a record, so it holds the partition rather than lose anything.
        ErrorClass::BadData => {
            tracing::error!(sink = name, error = %e, retry_in = ?delay, "sink failed on data it could not pin to a record; retrying without skipping records")
        }
        ErrorClass::Fatal => {
            tracing::error!(sink = name, error = %e, "sink cannot work with this configuration or these permissions; stopping the pod");
            shutdown.cancel();
            return false;
        }
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            b.next_delay();
        }
        let late = b.next_delay();
        assert!(
            late >= Duration::from_secs(1) && late <= Duration::from_secs(2),
            "{late:?}"
        );
    }
}
