//! One lane per sink: a task that owns the sink, takes its jobs (batches to write, flushes) in
//! order from a bounded queue, and reports each outcome as it comes.
//!
//! Why lanes: when every batch had to reach every sink before the pipeline took the next, the
//! slowest write of any sink (a lake roll: Parquet encoding, upload, Delta commit) held back
//! the others, and the pipeline took no records meanwhile. In its own lane each sink works
//! through the batches at its own pace, at most [`LANE_BATCHES`] full batches' worth of
//! records and bytes behind the pipeline, and the pipeline still commits to Kafka only the lowest offset
//! that every sink reports durable. A lane keeps the order of its jobs, so each sink still sees
//! every partition's records in Kafka order, and a sink that lost a batch (shutdown during its
//! retries) is offered no later one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{on_error, Backoff, Readiness};
use crate::batch::Batch;
use crate::sink::{Ack, AnySink, Sink, SinkError};
use crate::telemetry::METRICS;

/// How far a lane may fall behind, in full batches, counting the one it writes: at most this
/// many times `batch.max_records` records **and** this many times `batch.max_bytes` of decoded
/// size. The bound is in records and bytes, not batches, so that at low rates, where batches
/// close by age and are small, a lake roll or a Delta commit of a few hundred milliseconds does
/// not fill the lane and stall the other sinks. Both limits count: records alone let each lane
/// hold four or five batches of the bench's rows (they close by bytes at about 4,500 records),
/// bytes alone let a lane hold thousands of one-record batches of a small `batch.max_records`,
/// each a lake file and Delta commit, which a graceful stop then had to drain.
pub(super) const LANE_BATCHES: usize = 2;

pub(super) enum Job {
    Write(Arc<Batch>),
    /// Make due (or, when forced, all) buffered data durable.
    Flush {
        force: bool,
    },
}

/// The outcome of one job of one sink.
pub(super) struct Report {
    /// The sink's position in the pipeline's list.
    pub sink: usize,
    /// `None`: the sink did not finish the job (shutdown came during its retries, or it had
    /// already lost an earlier one), and it takes no later job.
    pub ack: Option<Ack>,
    pub was_flush: bool,
}

/// What every lane shares with the pipeline.
#[derive(Clone)]
pub(super) struct LaneContext {
    pub reports: mpsc::UnboundedSender<Report>,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
}

struct Lane {
    /// Unbounded: `room` bounds what a lane holds.
    jobs: mpsc::UnboundedSender<(Job, Option<Held>)>,
    room: Arc<Room>,
    task: JoinHandle<(AnySink, bool)>,
}

/// What a lane may hold, shared by the pipeline (which takes room for a batch) and the lane's
/// task (which gives it back when the batch is written).
struct Room {
    /// A permit per record; a job holds its batch's permits until it is done.
    records: Arc<Semaphore>,
    /// A permit per KiB of decoded size, held the same way.
    kib: Arc<Semaphore>,
    /// The permits a full batch takes of each (`batch.max_records`, `batch.max_bytes`): a batch
    /// that closed one record past its byte limit still fits [`LANE_BATCHES`] times.
    full_batch: (usize, usize),
    sink: &'static str,
}

/// A job's share of its lane's room: given back when the job is done (dropped).
struct Held {
    _records: OwnedSemaphorePermit,
    _kib: OwnedSemaphorePermit,
}

impl Room {
    fn new(max_records: usize, max_bytes: u64, sink: &'static str) -> Room {
        let most = Semaphore::MAX_PERMITS / LANE_BATCHES;
        let full_batch = (
            max_records.clamp(1, most),
            usize::try_from(max_bytes.div_ceil(1024)).map_or(most, |k| k.clamp(1, most)),
        );
        Room {
            records: Arc::new(Semaphore::new(full_batch.0 * LANE_BATCHES)),
            kib: Arc::new(Semaphore::new(full_batch.1 * LANE_BATCHES)),
            full_batch,
            sink,
        }
    }

    /// Waits until the lane has room for `batch`; a batch over a limit (one record larger than
    /// `batch.max_bytes`, or a limit lowered since) counts as a full one. Only the pipeline
    /// takes room, so waiting on one semaphore, then the other, cannot deadlock.
    async fn take(&self, batch: &Batch) -> Held {
        let permits = |n: usize, full: usize| u32::try_from(n.clamp(1, full)).unwrap_or(u32::MAX);
        let records = permits(batch.len(), self.full_batch.0);
        let kib = permits(batch.bytes.div_ceil(1024), self.full_batch.1);
        let never_closed = "lane semaphores are never closed";
        Held {
            _records: self
                .records
                .clone()
                .acquire_many_owned(records)
                .await
                .expect(never_closed),
            _kib: self
                .kib
                .clone()
                .acquire_many_owned(kib)
                .await
                .expect(never_closed),
        }
    }

    /// Publishes how many records the lane holds, as `cdc_lake_sink_queued_records`.
    fn report(&self) {
        let capacity = self.full_batch.0 * LANE_BATCHES;
        let queued = capacity.saturating_sub(self.records.available_permits());
        METRICS
            .queued
            .with_label_values(&[self.sink])
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
    }
}

/// The running lanes, in the order of the sinks.
pub(super) struct Lanes(Vec<Lane>);

impl Lanes {
    /// Starts a lane per sink. `failing[i]`: sink `i` already lost a batch; `retrying[i]` is set
    /// while sink `i` retries a failed job (the pipeline is not ready meanwhile).
    pub fn start(
        sinks: Vec<AnySink>,
        failing: &[bool],
        retrying: &[Arc<AtomicBool>],
        (max_records, max_bytes): (usize, u64),
        ctx: &LaneContext,
    ) -> Self {
        let lanes = sinks
            .into_iter()
            .enumerate()
            .map(|(index, sink)| {
                let (jobs, queue) = mpsc::unbounded_channel();
                let room = Arc::new(Room::new(max_records, max_bytes, sink.name()));
                let worker = Worker {
                    index,
                    sink,
                    failing: failing[index],
                    retrying: retrying[index].clone(),
                    ctx: ctx.clone(),
                    room: Arc::clone(&room),
                };
                Lane {
                    jobs,
                    room,
                    task: tokio::spawn(worker.run(queue)),
                }
            })
            .collect();
        Lanes(lanes)
    }

    /// Queues a job on every lane, waiting while a lane has no room for its records.
    pub async fn send_all(&self, job: impl Fn() -> Job) {
        for lane in &self.0 {
            let job = job();
            let held = match &job {
                Job::Write(batch) => Some(lane.room.take(batch).await),
                Job::Flush { .. } => None,
            };
            // Only a panic ends a lane while its queue is open. Go down with it, as the pipeline
            // did when a sink's task panicked: a lane that takes nothing would hold the commit
            // for good, where a restart resumes from the checkpoints.
            assert!(
                lane.jobs.send((job, held)).is_ok(),
                "the {} sink's lane ended: its task panicked",
                lane.room.sink
            );
            lane.room.report();
        }
    }

    /// Queues a flush on lane `i`.
    pub fn flush(&self, i: usize) {
        let _ = self.0[i].jobs.send((Job::Flush { force: false }, None));
    }

    /// Closes the queues, lets every lane finish what it holds, and returns each sink with
    /// whether it lost a batch. The reports of those jobs are in the pipeline's channel.
    pub async fn stop(self) -> Vec<(AnySink, bool)> {
        let mut parked = Vec::with_capacity(self.0.len());
        for Lane { jobs, task, .. } in self.0 {
            drop(jobs);
            match task.await {
                Ok(sink) => parked.push(sink),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("a sink's lane was cancelled: {e}"),
            }
        }
        parked
    }
}

struct Worker {
    index: usize,
    sink: AnySink,
    failing: bool,
    retrying: Arc<AtomicBool>,
    ctx: LaneContext,
    room: Arc<Room>,
}

impl Worker {
    async fn run(
        mut self,
        mut queue: mpsc::UnboundedReceiver<(Job, Option<Held>)>,
    ) -> (AnySink, bool) {
        // The room goes back when the job is done: its records leave the lane.
        while let Some((job, held)) = queue.recv().await {
            let was_flush = matches!(job, Job::Flush { .. });
            // A sink that lost a batch must not store a later one: that would move its
            // checkpoint over the lost records.
            let ack = if self.failing {
                None
            } else {
                match job {
                    Job::Write(batch) => self.write(&batch).await,
                    Job::Flush { force } => self.flush(force).await,
                }
            };
            self.failing = ack.is_none();
            drop(held);
            self.room.report();
            let report = Report {
                sink: self.index,
                ack,
                was_flush,
            };
            // The pipeline holds the receiver for as long as lanes run.
            let _ = self.ctx.reports.send(report);
        }
        (self.sink, self.failing)
    }

    /// Writes the batch, retried until it is durable; `None` when shutdown came first.
    async fn write(&mut self, batch: &Batch) -> Option<Ack> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            let started = Instant::now();
            match self.sink.write(batch).await {
                Ok(ack) => {
                    METRICS
                        .batch_seconds
                        .with_label_values(&[self.sink.name()])
                        .observe(started.elapsed().as_secs_f64());
                    return Some(self.succeeded(ack));
                }
                Err(e) => {
                    if !self.failed(&e, &mut backoff).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Flushes, retried like a write.
    async fn flush(&mut self, force: bool) -> Option<Ack> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            match self.sink.flush(force).await {
                Ok(ack) => return Some(self.succeeded(ack)),
                Err(e) => {
                    if !self.failed(&e, &mut backoff).await {
                        return None;
                    }
                }
            }
        }
    }

    fn succeeded(&self, ack: Ack) -> Ack {
        self.retrying.store(false, Ordering::Release);
        ack
    }

    /// Marks the sink as retrying and waits before the next attempt; false on shutdown.
    async fn failed(&self, e: &SinkError, backoff: &mut Backoff) -> bool {
        self.retrying.store(true, Ordering::Release);
        let ctx = &self.ctx;
        on_error(self.sink.name(), e, backoff, &ctx.readiness, &ctx.shutdown).await
    }
}
