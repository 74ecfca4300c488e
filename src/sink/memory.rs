//! An in-memory sink for unit tests of the pipeline. It keeps the same contract as the real
//! sinks and runs the same conformance suite; it is never the only proof of a feature.

use std::sync::{Arc, Mutex};

use super::{Ack, Offsets, Sink, SinkError, WriteStats};
use crate::batch::Batch;
use crate::domain::TopicPartition;
use crate::envelope::Decoded;

#[derive(Debug, Default)]
pub struct MemoryState {
    pub checkpoints: Offsets,
    /// Stored change records, as (partition, offset), in write order.
    pub stored: Vec<(TopicPartition, i64)>,
}

#[derive(Clone, Default)]
pub struct MemorySink {
    pub state: Arc<Mutex<MemoryState>>,
}

impl Sink for MemorySink {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn checkpoints(&mut self, partitions: &[TopicPartition]) -> Result<Offsets, SinkError> {
        let st = self.state.lock().expect("not poisoned");
        Ok(partitions
            .iter()
            .filter_map(|tp| st.checkpoints.get(tp).map(|o| (tp.clone(), *o)))
            .collect())
    }

    async fn write(&mut self, batch: &Batch) -> Result<Ack, SinkError> {
        let mut st = self.state.lock().expect("not poisoned");
        let next = super::checkpoint::after_batch(self.name(), &batch.ranges(), &st.checkpoints)?;
        let mut stats = WriteStats::default();
        for r in &batch.records {
            let c = r.coords();
            let tp = c.topic_partition();
            if c.offset < st.checkpoints.get(&tp).copied().unwrap_or(0) {
                stats.already_stored += 1;
                continue;
            }
            match r {
                Decoded::Change(_) => {
                    st.stored.push((tp.clone(), c.offset));
                    stats.written += 1;
                }
                Decoded::Reject(_) => *stats.ignored.entry("rejected").or_default() += 1,
                Decoded::Skip(_, reason) => *stats.ignored.entry(reason.as_str()).or_default() += 1,
            }
        }
        st.checkpoints.extend(next.clone());
        Ok(Ack {
            durable: next.into_iter().collect(),
            stats,
        })
    }

    async fn flush(&mut self, _force: bool) -> Result<Ack, SinkError> {
        Ok(Ack::default())
    }

    fn revoke(&mut self, _partitions: &[TopicPartition]) {}
}
