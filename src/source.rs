//! The Kafka source: a consumer-group member on its own thread that decodes records at the edge
//! and hands them to the pipeline over a bounded channel.
//!
//! Why a dedicated thread: librdkafka's rebalance callback runs on the polling thread, and it
//! must block until the pipeline has (on assign) looked up where each sink's checkpoint says to
//! start, or (on revoke) finished and committed its in-flight work, so that a revoked partition
//! is never written or committed by this pod afterwards. Polling also continues (paused) while
//! the sinks are slow, so the group never evicts us for not polling.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc;

use crate::config::KafkaConfig;
use crate::domain::Offsets;
use crate::domain::{KafkaCoordinates, TopicPartition};
use crate::envelope::{Decoded, Decoder};
use crate::telemetry::METRICS;

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
                tracing::info!(partitions = ?partitions.iter().map(ToString::to_string).collect::<Vec<_>>(), "partitions revoked");
                if !self.closing.load(Ordering::SeqCst) {
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
        // librdkafka prefetches up to 64 MiB per consumer by default; the pipeline already
        // buffers a batch, so a smaller prefetch bounds memory on a backlog without slowing it.
        .set("queued.max.messages.kbytes", "16384")
        .set("client.id", "cdc-lake");
    for (k, v) in &cfg.properties {
        cc.set(k, v);
    }
    let closing = Arc::new(AtomicBool::new(false));
    let ctx = SourceContext {
        events,
        rebalance_timeout,
        closing: closing.clone(),
    };
    let consumer: KafkaConsumer = cc.create_with_context(ctx)?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok((Arc::new(consumer), closing))
}

/// The polling loop. Returns when `stop` is set or the pipeline has gone away.
pub fn run_poll_loop(
    consumer: Arc<KafkaConsumer>,
    events: mpsc::Sender<SourceEvent>,
    stop: Arc<AtomicBool>,
    max_chunk: usize,
) {
    let mut decoder = Decoder::new();
    let mut chunk: Vec<Decoded> = Vec::new();
    let mut paused = false;
    let mut last_error_log = std::time::Instant::now() - Duration::from_secs(60);
    while !stop.load(Ordering::SeqCst) {
        // Hand over what we have; if the pipeline is busy, pause fetching but keep polling so
        // rebalances and the group session are still served.
        if !chunk.is_empty() {
            match events.try_send(SourceEvent::Records(std::mem::take(&mut chunk))) {
                Ok(()) => {
                    if paused {
                        if let Ok(a) = consumer.assignment() {
                            let _ = consumer.resume(&a);
                        }
                        paused = false;
                    }
                }
                Err(mpsc::error::TrySendError::Full(SourceEvent::Records(back))) => {
                    chunk = back;
                    if !paused {
                        if let Ok(a) = consumer.assignment() {
                            let _ = consumer.pause(&a);
                        }
                        paused = true;
                    }
                    // Served callbacks only: fetching is paused.
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
                        chunk.push(decode(&mut decoder, &m));
                    }
                    continue;
                }
                Err(_) => return,
            }
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            // Broker outages repeat every poll: log at most every 10 s.
            Some(Err(e)) if last_error_log.elapsed() > Duration::from_secs(10) => {
                tracing::warn!(error = %e, "kafka poll error");
                last_error_log = std::time::Instant::now();
            }
            Some(Err(_)) => {}
            Some(Ok(m)) => {
                chunk.push(decode(&mut decoder, &m));
                // Drain what is already fetched without waiting.
                while chunk.len() < max_chunk {
                    match consumer.poll(Duration::ZERO) {
                        Some(Ok(m)) => chunk.push(decode(&mut decoder, &m)),
                        _ => break,
                    }
                }
            }
        }
    }
}

fn decode(decoder: &mut Decoder, m: &rdkafka::message::BorrowedMessage<'_>) -> Decoded {
    METRICS.consumed.with_label_values(&[m.topic()]).inc();
    let coords = KafkaCoordinates {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
    };
    decoder.decode(coords, m.key(), m.payload())
}
