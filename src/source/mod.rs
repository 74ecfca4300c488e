//! The Kafka source: a consumer-group member on its own thread that decodes records at the edge
//! and hands them to the pipeline over a bounded channel.
//!
//! Why a dedicated thread: librdkafka's rebalance callback runs on the polling thread, and it
//! must block until the pipeline has (on assign) looked up where each sink's checkpoint says to
//! start, or (on revoke) finished and committed its in-flight work, so that a revoked partition
//! is never written or committed by this pod afterwards. Polling also continues (paused) while
//! the sinks are slow, so the group never evicts us for not polling.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc;

use crate::config::KafkaConfig;
use crate::domain::Offsets;
use crate::domain::TopicPartition;
use crate::envelope::Decoded;
use crate::telemetry::{Readiness, METRICS};

mod chunk;
mod decode;
pub mod registry;

use chunk::Chunk;
pub use chunk::ChunkLimits;
pub use decode::RecordDecoder;
pub use registry::RegistryUnavailable;

/// What the source tells the pipeline, in order.
pub enum SourceEvent {
    Records(Vec<Decoded>),
    /// Partitions were assigned; reply with the offset to start each from (absent: the
    /// beginning of the partition).
    Assigned {
        partitions: Vec<TopicPartition>,
        reply: std::sync::mpsc::SyncSender<Offsets>,
    },
    /// Partitions are being revoked; reply once nothing more will be written or committed for
    /// them.
    Revoked {
        partitions: Vec<TopicPartition>,
        done: std::sync::mpsc::SyncSender<()>,
    },
}

pub type KafkaConsumer = BaseConsumer<SourceContext>;

pub struct SourceContext {
    events: mpsc::Sender<SourceEvent>,
    /// How long a rebalance waits for the pipeline before going ahead.
    rebalance_timeout: Duration,
    closing: Arc<AtomicBool>,
    /// Partitions assigned or revoked since the poll loop last looked: what it holds for them
    /// is stale.
    rebalanced: Mutex<Vec<TopicPartition>>,
}

impl SourceContext {
    fn note_rebalanced(&self, partitions: &[TopicPartition]) {
        if let Ok(mut moved) = self.rebalanced.lock() {
            moved.extend_from_slice(partitions);
        }
    }

    fn take_rebalanced(&self) -> Vec<TopicPartition> {
        self.rebalanced
            .lock()
            .map(|mut moved| std::mem::take(&mut *moved))
            .unwrap_or_default()
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // librdkafka reports -1 for partitions it does not consume (and the internal
                // partition -1).
                if *partition >= 0 && p.consumer_lag >= 0 {
                    METRICS
                        .lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions = partitions_of(tpl);
                self.note_rebalanced(&partitions);
                let (reply, answer) = std::sync::mpsc::sync_channel(1);
                let starts = self
                    .events
                    .blocking_send(SourceEvent::Assigned {
                        partitions: partitions.clone(),
                        reply,
                    })
                    .ok()
                    .and_then(|()| answer.recv_timeout(self.rebalance_timeout).ok());
                for tp in &partitions {
                    let offset = match &starts {
                        Some(s) => s.get(tp).map_or(Offset::Beginning, |o| Offset::Offset(*o)),
                        // Kafka's committed offset never passes the lowest sink checkpoint, so
                        // it is a safe (if earlier) place to start when checkpoints are
                        // unreachable; each sink skips what it already has.
                        None => Offset::Stored,
                    };
                    if let Err(e) = tpl.set_partition_offset(&tp.topic, tp.partition, offset) {
                        tracing::error!(%tp, error = %e, "cannot set start offset");
                    }
                }
                if starts.is_none() {
                    tracing::warn!("sink checkpoints unavailable at assignment; starting from Kafka's committed offsets");
                }
                tracing::info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions assigned");
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions = partitions_of(tpl);
                self.note_rebalanced(&partitions);
                tracing::info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions revoked");
                // Rebalances run on the poll thread, which may block until the pipeline has
                // released the partitions. The consumer's close runs this too, on the thread
                // that drops the last handle: while stopping, or when a killed pod's tasks are
                // dropped on a runtime thread, where blocking panics. Then no pipeline waits
                // for the revoke, so it is not sent.
                let on_runtime = tokio::runtime::Handle::try_current().is_ok();
                if !self.closing.load(Ordering::SeqCst) && !on_runtime {
                    let (done, wait) = std::sync::mpsc::sync_channel(1);
                    if self
                        .events
                        .blocking_send(SourceEvent::Revoked { partitions, done })
                        .is_ok()
                        && wait.recv_timeout(self.rebalance_timeout).is_err()
                    {
                        tracing::warn!("pipeline did not release revoked partitions in time");
                    }
                }
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping assignment");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Builds the consumer: offsets are stored by the sinks, so auto-commit and offset store are
/// off and cdc-lake commits only what every sink holds durably.
pub fn create_consumer(
    cfg: &KafkaConfig,
    events: mpsc::Sender<SourceEvent>,
    rebalance_timeout: Duration,
) -> Result<(Arc<KafkaConsumer>, Arc<AtomicBool>), KafkaError> {
    let cc = client_config(cfg);
    let closing = Arc::new(AtomicBool::new(false));
    let ctx = SourceContext {
        events,
        rebalance_timeout,
        closing: closing.clone(),
        rebalanced: Mutex::new(Vec::new()),
    };
    let consumer: KafkaConsumer = cc.create_with_context(ctx)?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok((Arc::new(consumer), closing))
}

/// The consumer's librdkafka settings: the pod's own, then `kafka.properties` over them.
/// (`examples/broker_read_ceiling` reads with these too, so its ceiling is the pod's.)
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // CDC wants low latency: do not let the broker hold a fetch for librdkafka's 500 ms
        // default when few records are waiting. Overridable in kafka.properties.
        .set("fetch.wait.max.ms", "50")
        // librdkafka prefetches up to 64 MiB per consumer by default, and a heap profile of a
        // backlog found it holding about 2.6 times its prefetch setting in fetch buffers and
        // message headers.
        // The pipeline already buffers a batch, and with the short backoff below librdkafka
        // refills a small prefetch as fast as the pod drains it: 2 MiB took 35-40 MB off a
        // backlog's peak with the lake alone as fast as with 16 MiB (docs/performance.md).
        .set("queued.max.messages.kbytes", "2048")
        // Once that prefetch is full, librdkafka (2.4 and later) postpones the partition's next
        // fetch by `fetch.queue.backoff.ms`, 1 s by default: on a backlog the pipeline empties
        // the prefetch in a fraction of that and then sat idle for the rest (lake alone ran at
        // 40k events/s with two thirds of the run spent waiting, docs/performance.md). 10 ms
        // costs one cheap check per partition every 10 ms while the prefetch stays full.
        .set("fetch.queue.backoff.ms", "10")
        // A `^regex` subscription finds new topics (Debezium creates one per new table) only
        // when librdkafka refreshes its metadata: every 5 minutes by default, so a new table's
        // first changes would wait up to that long. One small metadata request every 10 s.
        .set("topic.metadata.refresh.interval.ms", "10000")
        .set("client.id", "cdc-lake");
    for (k, v) in &cfg.properties {
        cc.set(k, v);
    }
    cc
}

/// Records that wait for the Schema Registry, in arrival order. While any waits, every later
/// record waits behind it (so nothing passes a record on its partition) and fetching is paused.
struct Waiting {
    records: VecDeque<OwnedMessage>,
    next_try: Instant,
    backoff: Duration,
    last_log: Option<Instant>,
}

/// The first retry of a record whose schema could not be fetched, and the longest wait.
const REGISTRY_RETRY_FIRST: Duration = Duration::from_millis(250);
const REGISTRY_RETRY_MAX: Duration = Duration::from_secs(5);

impl Waiting {
    fn new() -> Self {
        Self {
            records: VecDeque::new(),
            next_try: Instant::now(),
            backoff: REGISTRY_RETRY_FIRST,
            last_log: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Holds `m` (which could not be decoded now, or arrived behind one that could not).
    fn hold(
        &mut self,
        m: OwnedMessage,
        unavailable: Option<RegistryUnavailable>,
        readiness: &Readiness,
    ) {
        if self.records.is_empty() {
            self.next_try = Instant::now() + self.backoff;
        }
        self.records.push_back(m);
        if let Some(e) = unavailable {
            self.report(&e, readiness);
        }
    }

    fn report(&mut self, e: &RegistryUnavailable, readiness: &Readiness) {
        readiness.set_source(false, "the schema registry cannot answer");
        // An outage repeats every retry: log at most every 10 s.
        if self
            .last_log
            .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            tracing::warn!(error = %e, waiting = self.records.len(), "records wait for the schema registry");
            self.last_log = Some(Instant::now());
        }
    }

    /// Decodes held records from the front, when a retry is due, until one still cannot be.
    fn retry(&mut self, decoder: &mut RecordDecoder, chunk: &mut Chunk, readiness: &Readiness) {
        if self.records.is_empty() || Instant::now() < self.next_try {
            return;
        }
        while let Some(m) = self.records.front() {
            match decoder.decode(m) {
                Ok(d) => {
                    chunk.push(d);
                    self.records.pop_front();
                }
                Err(e) => {
                    self.backoff = (self.backoff * 2).min(REGISTRY_RETRY_MAX);
                    self.next_try = Instant::now() + self.backoff;
                    self.report(&e, readiness);
                    return;
                }
            }
        }
        self.backoff = REGISTRY_RETRY_FIRST;
        self.last_log = None;
        readiness.set_source(true, "the schema registry answers");
    }

    /// Drops what is held for partitions a rebalance moved: on assignment they are fetched
    /// again from the sinks' checkpoints.
    fn forget(&mut self, partitions: &[TopicPartition], readiness: &Readiness) {
        if self.records.is_empty() {
            return;
        }
        self.records
            .retain(|m| !partitions.contains(&TopicPartition::new(m.topic(), m.partition())));
        if self.records.is_empty() {
            self.backoff = REGISTRY_RETRY_FIRST;
            readiness.set_source(true, "no record waits for the schema registry");
        }
    }
}

/// A fetched record: decoded into `chunk`, or held while records wait for the registry.
fn take(
    m: BorrowedMessage<'_>,
    decoder: &mut RecordDecoder,
    chunk: &mut Chunk,
    waiting: &mut Waiting,
    readiness: &Readiness,
) {
    METRICS.consumed.with_label_values(&[m.topic()]).inc();
    if !waiting.is_empty() {
        waiting.hold(m.detach(), None, readiness);
        return;
    }
    match decoder.decode(&m) {
        Ok(d) => chunk.push(d),
        Err(e) => waiting.hold(m.detach(), Some(e), readiness),
    }
}

/// Pauses or resumes fetching for the whole assignment, when that changes or when the
/// assignment itself changed (`refresh`: what a new assignment's partitions are is librdkafka's
/// business, so it is set again either way).
fn set_paused(consumer: &KafkaConsumer, paused: &mut bool, want: bool, refresh: bool) {
    if *paused == want && !refresh {
        return;
    }
    if want && !*paused {
        METRICS.fetch_pauses.inc();
    }
    if let Ok(assignment) = consumer.assignment() {
        let _ = if want {
            consumer.pause(&assignment)
        } else {
            consumer.resume(&assignment)
        };
    }
    *paused = want;
}

/// How long the poll thread waits for the pipeline to take a chunk before it pauses fetching.
/// Pausing purges librdkafka's queue of prefetched records, which are fetched again on resume:
/// pausing whenever the pipeline was busy with a batch stalled it about 0.4 s per pause on a
/// backlog (docs/performance.md). The wait delays a rebalance callback by at most this, far
/// below `max.poll.interval.ms`.
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// How often a waiting poll thread offers its chunk again.
const HAND_OVER_RETRY: Duration = Duration::from_millis(1);

/// The polling loop. Returns when `stop` is set or the pipeline has gone away.
pub fn run_poll_loop(
    consumer: Arc<KafkaConsumer>,
    events: mpsc::Sender<SourceEvent>,
    stop: Arc<AtomicBool>,
    limits: ChunkLimits,
    mut decoder: RecordDecoder,
    readiness: Readiness,
) {
    let mut chunk = Chunk::default();
    let mut waiting = Waiting::new();
    // Whether fetching is paused: while the pipeline is busy or records wait for the registry.
    let mut paused = false;
    let mut last_error_log = Instant::now() - Duration::from_secs(60);
    // A pipeline that is gone (its task ended or was dropped) stops the thread too, so it
    // never polls on for nobody.
    while !stop.load(Ordering::SeqCst) && !events.is_closed() {
        let moved = consumer.context().take_rebalanced();
        let rebalanced = !moved.is_empty();
        if rebalanced {
            waiting.forget(&moved, &readiness);
        }
        waiting.retry(&mut decoder, &mut chunk, &readiness);
        let mut pipeline_busy = false;
        // Hand over what we have. A pipeline busy with its batch is waited for; one busy for
        // longer (a sink retrying through an outage) gets fetching paused, while polling goes
        // on so rebalances and the group session are still served.
        if !chunk.is_empty() {
            let full_since = Instant::now();
            loop {
                let (records, bytes) = chunk.take();
                match events.try_send(SourceEvent::Records(records)) {
                    Ok(()) => break,
                    Err(mpsc::error::TrySendError::Full(SourceEvent::Records(back))) => {
                        chunk.restore(back, bytes);
                        if paused
                            || full_since.elapsed() >= PAUSE_AFTER
                            || stop.load(Ordering::SeqCst)
                        {
                            pipeline_busy = true;
                            break;
                        }
                        std::thread::sleep(HAND_OVER_RETRY);
                    }
                    Err(_) => return,
                }
            }
        }
        set_paused(
            &consumer,
            &mut paused,
            pipeline_busy || !waiting.is_empty(),
            rebalanced,
        );
        if pipeline_busy {
            // Served callbacks only: fetching is paused.
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
                take(m, &mut decoder, &mut chunk, &mut waiting, &readiness);
            }
            continue;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            // Broker outages repeat every poll: log at most every 10 s.
            Some(Err(e)) if last_error_log.elapsed() > Duration::from_secs(10) => {
                tracing::warn!(error = %e, "kafka poll error");
                last_error_log = Instant::now();
            }
            Some(Err(_)) => {}
            Some(Ok(m)) => {
                take(m, &mut decoder, &mut chunk, &mut waiting, &readiness);
                // Drain what is already fetched without waiting.
                while !chunk.is_full(limits) && waiting.is_empty() {
                    match consumer.poll(Duration::ZERO) {
                        Some(Ok(m)) => take(m, &mut decoder, &mut chunk, &mut waiting, &readiness),
                        _ => break,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(properties: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "g".into(),
            checkpoint_name: None,
            topics: vec!["t".into()],
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            format: Default::default(),
            schema_registry: None,
        }
    }

    /// librdkafka's own default (1 s) idles the pod each time its prefetch fills on a backlog
    /// (docs/performance.md); the operator's `kafka.properties` still win.
    #[test]
    fn a_full_prefetch_delays_the_next_fetch_briefly_unless_the_operator_says_otherwise() {
        let ours = client_config(&kafka(&[]));
        let backoff_ms: u64 = ours
            .get("fetch.queue.backoff.ms")
            .expect("set by the pod")
            .parse()
            .expect("a number");
        assert!(backoff_ms <= 50, "{backoff_ms} ms");
        assert_eq!(ours.get("queued.max.messages.kbytes"), Some("2048"));

        let theirs = client_config(&kafka(&[("fetch.queue.backoff.ms", "250")]));
        assert_eq!(theirs.get("fetch.queue.backoff.ms"), Some("250"));
    }
}
