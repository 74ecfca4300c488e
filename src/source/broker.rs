//! What the pipeline asks of Kafka besides records: commits (for monitoring; the sinks hold the
//! checkpoints) and whether a partition's log still reaches a sink's checkpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::KafkaConsumer;
use crate::config::KafkaConfig;
use crate::domain::{LogBounds, Offsets, TopicPartition};
use crate::pipeline::Committer;

/// How long the broker has to report a partition's watermarks.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the probe reads a log that seems shorter than a checkpoint. A log that reaches
/// the checkpoint answers within one fetch; only a log that started over waits this long.
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
            // Past the end the probe gets nothing rather than jumping back to the start.
            .set("auto.offset.reset", "error")
            .set("fetch.wait.max.ms", "50")
            .set("client.id", "cdc-lake-log-probe");
        Self { consumer, probe }
    }

    /// Reads each partition from just below the lowest checkpoint its watermark does not
    /// cover, up to the highest one, and returns one past the last offset it saw per
    /// partition. The high watermark alone cannot be trusted here: the dev broker (tansu)
    /// reports one past the *first* offset of the last batch, so a checkpoint sits past it after
    /// any batch of several records (measured: 5 records in one batch, watermark 1).
    fn read_ends(&self, from: &[(TopicPartition, i64, i64)]) -> HashMap<TopicPartition, i64> {
        let mut seen = HashMap::new();
        let reader: BaseConsumer = match self.probe.create() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the log probe; a log that started over goes unnoticed");
                return seen;
            }
        };
        let mut tpl = TopicPartitionList::new();
        for (tp, lowest, _) in from {
            if tpl
                .add_partition_offset(&tp.topic, tp.partition, Offset::Offset(lowest - 1))
                .is_err()
            {
                return seen;
            }
        }
        if let Err(e) = reader.assign(&tpl) {
            tracing::warn!(error = %e, "log probe: assign failed");
            return seen;
        }
        let wanted: HashMap<(&str, i32), i64> = from
            .iter()
            .map(|(tp, _, highest)| ((tp.topic.as_str(), tp.partition), *highest))
            .collect();
        let mut reached = 0;
        let deadline = Instant::now() + PROBE_TIMEOUT;
        while reached < wanted.len() && Instant::now() < deadline {
            let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) else {
                continue;
            };
            let Some(highest) = wanted.get(&(m.topic(), m.partition())) else {
                continue;
            };
            let end = seen
                .entry(TopicPartition::new(m.topic(), m.partition()))
                .or_insert(0);
            let before = *end;
            *end = (*end).max(m.offset() + 1);
            if before < *highest && *end >= *highest {
                reached += 1;
            }
        }
        seen
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
        let mut unsure = Vec::new();
        for (tp, checkpoint) in highest {
            match self
                .consumer
                .fetch_watermarks(&tp.topic, tp.partition, WATERMARKS_TIMEOUT)
            {
                Ok((start, end)) => {
                    if *checkpoint > end {
                        unsure.push((tp.clone(), end.max(1), *checkpoint));
                    }
                    bounds.insert(tp.clone(), LogBounds { start, end });
                }
                Err(e) => {
                    tracing::warn!(%tp, error = %e, "cannot read the partition's watermarks; a log that started over goes unnoticed here");
                }
            }
        }
        if !unsure.is_empty() {
            for (tp, end) in self.read_ends(&unsure) {
                if let Some(b) = bounds.get_mut(&tp) {
                    b.end = b.end.max(end);
                }
            }
        }
        bounds
    }
}
