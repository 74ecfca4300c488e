//! What the pipeline asks of Kafka besides records: commits (for monitoring; the sinks hold the
//! checkpoints) and whether a partition's log still reaches a sink's checkpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::Committer;
use crate::config::KafkaConfig;
use crate::domain::{LogBounds, Offsets, TopicPartition};
use crate::source::KafkaConsumer;

/// How long the broker has to report a partition's watermarks.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the probe may read one partition whose watermark is below a checkpoint. It ends
/// well before: at a record just below the checkpoint, or at the log's end (partition EOF).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct KafkaBroker {
    consumer: Arc<KafkaConsumer>,
    /// A group-less reader's settings: the pod's brokers and properties (security included).
    probe: ClientConfig,
}

impl KafkaBroker {
    pub fn new(consumer: Arc<KafkaConsumer>, cfg: &KafkaConfig) -> Self {
        let mut probe = ClientConfig::new();
        probe.set("bootstrap.servers", &cfg.brokers);
        for (k, v) in &cfg.properties {
            probe.set(k, v);
        }
        probe
            .set("group.id", format!("{}-log-probe", cfg.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Past the end the probe gets nothing rather than jumping back to the start; at the
            // end it gets an EOF event.
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "50")
            .set("client.id", "cdc-lake-log-probe");
        Self { consumer, probe }
    }

    /// How far `tp`'s log reaches, read from `from` (the last offset the watermark vouches for)
    /// towards `checkpoint`: `checkpoint` once a record just below it is seen, else one past
    /// the last record before the broker says there is nothing more (partition EOF). `None`
    /// when neither happens in time: undecided, so nothing is moved.
    ///
    /// The watermark alone cannot be trusted here: the dev broker (tansu) reports one past the
    /// *first* offset of the last batch, so after any batch of several records a checkpoint
    /// sits past it (measured: 40 records in one batch, watermark 1). A reader of its own per
    /// partition, so an EOF event is always this partition's (rdkafka's names only the
    /// partition number).
    fn read_end(&self, tp: &TopicPartition, from: i64, checkpoint: i64) -> Option<i64> {
        let reader: BaseConsumer = self
            .probe
            .create()
            .inspect_err(|e| tracing::warn!(%tp, error = %e, "cannot create the log probe"))
            .ok()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(from))
            .ok()?;
        reader.assign(&tpl).ok()?;
        let deadline = Instant::now() + PROBE_TIMEOUT;
        let mut next = from;
        while Instant::now() < deadline {
            match reader.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    next = next.max(m.offset() + 1);
                    if next >= checkpoint {
                        return Some(next);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => return Some(next),
                _ => {}
            }
        }
        tracing::warn!(%tp, checkpoint, "log probe: no answer in time; the partition is taken as it is");
        None
    }
}

impl Committer for KafkaBroker {
    fn commit(&self, offsets: &Offsets, sync: bool) {
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (tp, o) in offsets {
            if tpl
                .add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*o))
                .is_err()
            {
                return;
            }
        }
        let mode = if sync {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        if let Err(e) = Consumer::commit(self.consumer.as_ref(), &tpl, mode) {
            tracing::warn!(error = %e, "kafka commit failed (monitoring only; sinks hold the checkpoints)");
        }
    }

    fn log_bounds(&self, highest: &[(TopicPartition, i64)]) -> HashMap<TopicPartition, LogBounds> {
        let mut bounds = HashMap::new();
        // Partitions whose watermark is below the checkpoint: read to tell a short watermark from a
        // log that started over.
        let mut unsure = Vec::new();
        for (tp, checkpoint) in highest {
            match self
                .consumer
                .fetch_watermarks(&tp.topic, tp.partition, WATERMARKS_TIMEOUT)
            {
                Ok((start, end)) => {
                    if *checkpoint > end {
                        unsure.push((tp.clone(), (end - 1).max(0), *checkpoint));
                    }
                    bounds.insert(tp.clone(), LogBounds { start, end });
                }
                Err(e) => {
                    tracing::warn!(%tp, error = %e, "cannot read the partition's watermarks; a log that started over goes unnoticed here");
                }
            }
        }
        for (tp, from, checkpoint) in unsure {
            match self.read_end(&tp, from, checkpoint) {
                Some(end) => {
                    if let Some(b) = bounds.get_mut(&tp) {
                        b.end = b.end.max(end);
                    }
                }
                None => {
                    bounds.remove(&tp);
                }
            }
        }
        bounds
    }
}
