//! The run loop in process: memory sinks and a recording committer stand in for the stores and
//! the broker, so these tests need no service and wait on the sinks' notifications, never on
//! sleeps. They cover assignment and revocation, the Kafka commit as the lowest durable
//! checkpoint, a sink that acknowledges late, a failing sink, and the drain on shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdc_lake::config::{BatchConfig, ByteSize, HumanDuration};
use cdc_lake::domain::{KafkaCoordinates, TopicPartition};
use cdc_lake::envelope::{Decoded, Decoder};
use cdc_lake::pipeline::{AnySink, Committer, Pipeline, Readiness, UnfinishedSinks};
use cdc_lake::sink::memory::MemorySink;
use cdc_lake::sink::Offsets;
use cdc_lake::source::SourceEvent;
use cdc_lake::telemetry::METRICS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

/// Every commit the pipeline makes, in order.
#[derive(Clone, Default)]
struct RecordingCommitter(Arc<Mutex<Vec<Offsets>>>);

impl Committer for RecordingCommitter {
    fn commit(&self, offsets: &Offsets, _sync: bool) {
        self.0.lock().unwrap().push(offsets.clone());
    }
}

impl RecordingCommitter {
    /// The highest offset committed for `tp` so far.
    fn committed(&self, tp: &TopicPartition) -> Option<i64> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| c.get(tp).copied())
            .max()
    }
}

fn tp(partition: i32) -> TopicPartition {
    TopicPartition::new("t", partition)
}

/// Change records of partition `partition` at `offsets`.
fn records(partition: i32, offsets: std::ops::Range<i64>) -> Vec<Decoded> {
    let mut decoder = Decoder::new();
    offsets
        .map(|o| {
            let coords = KafkaCoordinates {
                topic: "t".into(),
                partition,
                offset: o,
                timestamp_ms: Some(1_700_000_000_000),
            };
            let value = format!(
                r#"{{"before":null,"after":{{"id":{o}}},"source":{{"schema":"public","table":"p","ts_ms":1,"lsn":{o}}},"op":"c","ts_ms":1}}"#
            );
            decoder.decode(coords, Some(br#"{"id":1}"#), Some(value.as_bytes()))
        })
        .collect()
}

/// A running pipeline and the channel the source would feed.
struct Harness {
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
    committer: RecordingCommitter,
    readiness: Readiness,
    run: tokio::task::JoinHandle<Result<(), UnfinishedSinks>>,
}

impl Harness {
    fn start(sinks: Vec<MemorySink>) -> Harness {
        Harness::start_with(
            sinks,
            BatchConfig {
                max_records: 1000,
                max_bytes: ByteSize(1 << 20),
                max_age: HumanDuration(Duration::from_millis(10)),
            },
        )
    }

    fn start_with(sinks: Vec<MemorySink>, batch: BatchConfig) -> Harness {
        let (tx, rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let committer = RecordingCommitter::default();
        let readiness = Readiness::default();
        let pipeline = Pipeline::new(
            sinks.into_iter().map(AnySink::Memory).collect(),
            committer.clone(),
            batch,
            readiness.clone(),
            shutdown.clone(),
        );
        let run = tokio::spawn(pipeline.run(rx, Duration::from_secs(2)));
        Harness {
            events: tx,
            shutdown,
            committer,
            readiness,
            run,
        }
    }

    /// Assigns partitions as the source's rebalance callback would; returns the start offsets.
    async fn assign(&self, partitions: Vec<TopicPartition>) -> Offsets {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.events
            .send(SourceEvent::Assigned { partitions, reply })
            .await
            .unwrap();
        tokio::task::spawn_blocking(move || answer.recv().unwrap())
            .await
            .unwrap()
    }

    async fn revoke(&self, partitions: Vec<TopicPartition>) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.events
            .send(SourceEvent::Revoked { partitions, done })
            .await
            .unwrap();
        tokio::task::spawn_blocking(move || wait.recv().unwrap())
            .await
            .unwrap();
    }

    async fn send(&self, records: Vec<Decoded>) {
        self.events
            .send(SourceEvent::Records(records))
            .await
            .unwrap();
    }

    async fn stop(self) -> Result<(), UnfinishedSinks> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.run).await.unwrap().unwrap()
    }
}

/// Two sinks on partition 0, the second failing: after the first batch (offsets 0..3) and
/// `attempts` failed attempts to store it.
async fn one_sink_failing(
    ok: &'static str,
    bad: &'static str,
    attempts: u64,
) -> (Harness, MemorySink, MemorySink) {
    let (ok, bad) = (MemorySink::named(ok), MemorySink::named(bad));
    bad.set_failing(true);
    let h = Harness::start(vec![ok.clone(), bad.clone()]);
    h.assign(vec![tp(0)]).await;
    h.send(records(0, 0..3)).await;
    bad.wait_for("failed attempts", WAIT, |st| st.attempts >= attempts)
        .await;
    (h, ok, bad)
}

fn stored(sink: &MemorySink, partition: i32) -> Vec<i64> {
    let st = sink.state.lock().unwrap();
    st.stored
        .iter()
        .filter(|(t, _)| *t == tp(partition))
        .map(|(_, o)| *o)
        .collect()
}

#[tokio::test]
async fn partitions_start_at_the_lowest_sink_checkpoint() {
    let (a, b) = (MemorySink::named("a"), MemorySink::named("b"));
    a.state.lock().unwrap().checkpoints.insert(tp(0), 5);
    b.state.lock().unwrap().checkpoints.insert(tp(0), 3);
    let h = Harness::start(vec![a.clone(), b.clone()]);
    let starts = h.assign(vec![tp(0), tp(1)]).await;
    assert_eq!(starts.get(&tp(0)), Some(&3), "the lowest checkpoint");
    assert_eq!(starts.get(&tp(1)), None, "no checkpoint: the beginning");
    // Redelivery from 3: each sink skips what it has.
    h.send(records(0, 3..8)).await;
    a.wait_for("a at 8", WAIT, |st| st.checkpoints.get(&tp(0)) == Some(&8))
        .await;
    b.wait_for("b at 8", WAIT, |st| st.checkpoints.get(&tp(0)) == Some(&8))
        .await;
    assert_eq!(stored(&a, 0), vec![5, 6, 7]);
    assert_eq!(stored(&b, 0), vec![3, 4, 5, 6, 7]);
    h.stop().await.unwrap();
}

#[tokio::test]
async fn the_kafka_commit_is_the_lowest_durable_checkpoint_and_waits_for_a_late_ack() {
    let fast = MemorySink::named("fast");
    let late = MemorySink::named("late").buffering();
    // Both start from a stored checkpoint, so both have a durable offset from the start.
    for s in [&fast, &late] {
        s.state.lock().unwrap().checkpoints.insert(tp(0), 0);
    }
    let h = Harness::start(vec![fast.clone(), late.clone()]);
    h.assign(vec![tp(0)]).await;
    h.send(records(0, 0..10)).await;
    fast.wait_for("fast at 10", WAIT, |st| {
        st.checkpoints.get(&tp(0)) == Some(&10)
    })
    .await;
    late.wait_for("late buffered 10", WAIT, |st| {
        st.pending.get(&tp(0)) == Some(&10)
    })
    .await;
    assert_eq!(
        h.committer.committed(&tp(0)).unwrap_or(0),
        0,
        "nothing past 0 is committed while a sink holds the records only in its buffer"
    );
    let committer = h.committer.clone();
    // Shutdown drains: the late sink's forced flush makes them durable, then the commit.
    h.stop().await.unwrap();
    assert_eq!(
        late.state.lock().unwrap().checkpoints.get(&tp(0)),
        Some(&10)
    );
    assert_eq!(committer.committed(&tp(0)), Some(10));
}

#[tokio::test]
async fn revoked_partitions_are_never_written_or_committed_again() {
    let sink = MemorySink::named("s");
    let h = Harness::start(vec![sink.clone()]);
    h.assign(vec![tp(0), tp(1)]).await;
    h.send(records(0, 0..3)).await;
    sink.wait_for("p0 at 3", WAIT, |st| st.checkpoints.get(&tp(0)) == Some(&3))
        .await;
    h.revoke(vec![tp(0)]).await;
    let commits_at_revoke = h.committer.0.lock().unwrap().len();
    // Records of the revoked partition still in flight from the source are dropped.
    h.send(records(0, 3..6)).await;
    h.send(records(1, 0..2)).await;
    sink.wait_for("p1 at 2", WAIT, |st| st.checkpoints.get(&tp(1)) == Some(&2))
        .await;
    let committer = h.committer.clone();
    h.stop().await.unwrap();
    assert_eq!(
        stored(&sink, 0),
        vec![0, 1, 2],
        "nothing after the revocation"
    );
    let later = committer.0.lock().unwrap()[commits_at_revoke..].to_vec();
    assert!(
        later.iter().all(|c| !c.contains_key(&tp(0))),
        "no commit for a revoked partition: {later:?}"
    );
}

#[tokio::test]
async fn a_failing_sink_holds_its_checkpoint_and_gets_no_later_batch_after_shutdown() {
    let (h, healthy, failing) = one_sink_failing("healthy", "failing", 2).await;
    // More records arrive while the sink fails, then SIGTERM.
    h.send(records(0, 3..5)).await;
    let committer = h.committer.clone();
    let err = h
        .stop()
        .await
        .expect_err("a sink that never finished is an error");
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(err.0[0].0, "failing");
    assert_eq!(err.0[0].1.get(&tp(0)), Some(&0), "resumes from 0: {err}");
    // The healthy sink took everything, the failing one nothing (no later batch could jump its
    // checkpoint over the batch it lost), and nothing was committed past the failing sink.
    assert_eq!(stored(&healthy, 0), vec![0, 1, 2, 3, 4]);
    assert!(stored(&failing, 0).is_empty());
    assert_eq!(
        failing.state.lock().unwrap().attempted_up_to.get(&tp(0)),
        Some(&2),
        "the batch after the lost one was never offered to the failing sink"
    );
    assert_eq!(failing.state.lock().unwrap().checkpoints.get(&tp(0)), None);
    assert_eq!(committer.committed(&tp(0)), None);
}

#[tokio::test]
async fn a_sink_that_recovers_gets_every_record_in_order() {
    let sink = MemorySink::named("flaky");
    sink.set_failing(true);
    let h = Harness::start(vec![sink.clone()]);
    h.assign(vec![tp(0)]).await;
    h.send(records(0, 0..4)).await;
    sink.wait_for("a failed attempt", WAIT, |st| st.attempts >= 1)
        .await;
    sink.set_failing(false);
    h.send(records(0, 4..6)).await;
    sink.wait_for("all six", WAIT, |st| st.checkpoints.get(&tp(0)) == Some(&6))
        .await;
    let committer = h.committer.clone();
    h.stop().await.unwrap();
    assert_eq!(stored(&sink, 0), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(committer.committed(&tp(0)), Some(6));
}

#[tokio::test]
async fn a_sink_that_falls_behind_holds_back_the_commit_but_not_the_other_sinks() {
    let (h, fast, stuck) = one_sink_failing("fast", "stuck", 1).await;
    // Two more batches while one sink retries: the other stores them as they come.
    h.send(records(0, 3..6)).await;
    fast.wait_for("fast at 6", WAIT, |st| {
        st.checkpoints.get(&tp(0)) == Some(&6)
    })
    .await;
    h.send(records(0, 6..8)).await;
    fast.wait_for("fast at 8", WAIT, |st| {
        st.checkpoints.get(&tp(0)) == Some(&8)
    })
    .await;
    assert_eq!(
        h.committer.committed(&tp(0)),
        None,
        "nothing is committed past a sink that has not stored it"
    );
    assert!(
        !h.readiness.get(),
        "not ready while a sink retries, though the other acknowledges"
    );
    queued_reaches("stuck", 8).await;
    stuck.set_failing(false);
    stuck
        .wait_for("stuck at 8", WAIT, |st| {
            st.checkpoints.get(&tp(0)) == Some(&8)
        })
        .await;
    queued_reaches("stuck", 0).await;
    let (committer, readiness) = (h.committer.clone(), h.readiness.clone());
    h.stop().await.unwrap();
    assert_eq!(
        stored(&stuck, 0),
        (0..8).collect::<Vec<_>>(),
        "in order, once each"
    );
    assert_eq!(stored(&fast, 0), (0..8).collect::<Vec<_>>());
    assert_eq!(committer.committed(&tp(0)), Some(8));
    assert!(readiness.get(), "ready again once every sink caught up");
}

/// A sink that falls behind holds at most two full batches, by records (`batch.max_records`)
/// and by decoded size (`batch.max_bytes`), whichever binds first; then the pipeline waits for
/// it and takes no more records. So what the pod holds is bounded in bytes at any row width,
/// and a sink is never thousands of small batches behind (each a lake file and Delta commit
/// that a graceful stop would have to drain).
async fn a_lane_holds_two_batches_then_the_pipeline_waits(
    batch: BatchConfig,
    fast: &'static str,
    stuck_name: &'static str,
) {
    let (fast, stuck) = (MemorySink::named(fast), MemorySink::named(stuck_name));
    stuck.set_failing(true);
    let h = Harness::start_with(vec![fast.clone(), stuck.clone()], batch);
    h.assign(vec![tp(0)]).await;
    // One record per hand-over: three for the pipeline, then four that fill the channel
    // (it holds four) while the pipeline waits.
    let mut pending = records(0, 0..20).into_iter();
    for r in pending.by_ref().take(7) {
        h.send(vec![r]).await;
    }
    // Batches 0, 1 and 2 reached the fast sink; the stuck one holds 0 (retried) and 1, and
    // batch 2 waits for room in its lane, so the pipeline takes nothing more.
    fast.wait_for("fast at 3", WAIT, |st| {
        st.checkpoints.get(&tp(0)) == Some(&3)
    })
    .await;
    queued_reaches(stuck_name, 2).await;
    assert_eq!(
        h.events.capacity(),
        0,
        "the pipeline waits for the stuck lane and takes no more records"
    );
    assert_eq!(
        stored(&fast, 0),
        vec![0, 1, 2],
        "no batch passed the full lane"
    );
    stuck.set_failing(false);
    for r in pending {
        h.send(vec![r]).await;
    }
    for sink in [&fast, &stuck] {
        sink.wait_for("all 20", WAIT, |st| st.checkpoints.get(&tp(0)) == Some(&20))
            .await;
    }
    h.stop().await.unwrap();
    assert_eq!(stored(&stuck, 0), (0..20).collect::<Vec<_>>());
    assert_eq!(stored(&fast, 0), (0..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_lane_holds_two_batches_by_decoded_size_then_the_pipeline_waits() {
    assert!(
        records(0, 0..1)[0].size_bytes() > 1024,
        "each record fills a 1 KiB batch by bytes, far below its 1,000-record limit"
    );
    let batch = BatchConfig {
        max_records: 1000,
        max_bytes: ByteSize(1024),
        max_age: HumanDuration(Duration::from_millis(10)),
    };
    a_lane_holds_two_batches_then_the_pipeline_waits(batch, "fast-bytes", "stuck-bytes").await;
}

#[tokio::test]
async fn a_lane_holds_two_batches_by_records_then_the_pipeline_waits() {
    let batch = BatchConfig {
        max_records: 1,
        max_bytes: ByteSize(1 << 20),
        max_age: HumanDuration(Duration::from_millis(10)),
    };
    a_lane_holds_two_batches_then_the_pipeline_waits(batch, "fast-records", "stuck-records").await;
}

/// Waits until `cdc_lake_sink_queued_records{sink}` reads `n` (the lane sets it after each
/// hand-over and each finished job).
async fn queued_reaches(sink: &str, n: i64) {
    let gauge = METRICS.queued.with_label_values(&[sink]);
    let deadline = tokio::time::Instant::now() + WAIT;
    while gauge.get() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sink}: {} records queued, expected {n}",
            gauge.get()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
