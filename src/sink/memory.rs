//! An in-memory sink for unit tests of the pipeline. It keeps the same contract as the real
//! sinks and runs the same conformance suite; it is never the only proof of a feature.
//!
//! Tests wait on it instead of sleeping: [`MemorySink::wait_for`] wakes on every write and
//! flush (supabase/etl's test destination with `notify_on_events` is the model). It can be
//! made to fail ([`MemorySink::set_failing`]) or to acknowledge only on a forced flush, like a
//! buffering sink ([`MemorySink::buffering`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{checkpoint, Ack, Offsets, Sink, SinkError, WriteStats};
use crate::batch::Batch;
use crate::domain::TopicPartition;
use crate::envelope::Decoded;

#[derive(Debug, Default)]
pub struct MemoryState {
    /// Durable checkpoints: what a restarted sink would read back.
    pub checkpoints: Offsets,
    /// Stored change records, as (partition, offset), in write order.
    pub stored: Vec<(TopicPartition, i64)>,
    /// Buffered, not yet durable (buffering mode): the checkpoint the next forced flush makes
    /// durable.
    pub pending: Offsets,
    /// Write and flush attempts, failed ones included.
    pub attempts: u64,
    /// Per partition: the highest offset any write attempt carried, failed ones included.
    pub attempted_up_to: Offsets,
}

#[derive(Clone)]
pub struct MemorySink {
    name: &'static str,
    pub state: Arc<Mutex<MemoryState>>,
    failing: Arc<AtomicBool>,
    buffering: bool,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for MemorySink {
    fn default() -> Self {
        Self::named("memory")
    }
}

impl MemorySink {
    pub fn named(name: &'static str) -> Self {
        Self {
            name,
            state: Arc::default(),
            failing: Arc::default(),
            buffering: false,
            changed: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// A sink that acknowledges records as durable only on a forced flush (as the lake does
    /// when it commits a file).
    pub fn buffering(mut self) -> Self {
        self.buffering = true;
        self
    }

    /// While set, every write and flush fails with a transient error.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Waits until `condition` holds, woken by every write and flush; panics with `what` after
    /// `timeout` (which only stops a hung test).
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&MemoryState) -> bool,
    ) {
        let mut changes = self.changed.subscribe();
        let wait = async {
            loop {
                if condition(&self.state.lock().expect("not poisoned")) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            panic!(
                "{}: timed out after {timeout:?} waiting for {what}",
                self.name
            );
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn injected_failure(&self) -> Option<SinkError> {
        self.failing
            .load(Ordering::SeqCst)
            .then(|| SinkError::ObjectStore {
                path: self.name.to_string(),
                source: object_store::Error::Generic {
                    store: "memory",
                    source: "injected failure".into(),
                },
            })
    }
}

impl Sink for MemorySink {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn checkpoints(&mut self, partitions: &[TopicPartition]) -> Result<Offsets, SinkError> {
        let st = self.state.lock().expect("not poisoned");
        Ok(partitions
            .iter()
            .filter_map(|tp| st.checkpoints.get(tp).map(|o| (tp.clone(), *o)))
            .collect())
    }

    async fn write(&mut self, batch: &Batch) -> Result<Ack, SinkError> {
        let result = self.write_locked(batch);
        self.notify();
        result
    }

    async fn flush(&mut self, force: bool) -> Result<Ack, SinkError> {
        let result = {
            let mut st = self.state.lock().expect("not poisoned");
            st.attempts += 1;
            match self.injected_failure() {
                Some(e) => Err(e),
                None => {
                    if force {
                        let pending = std::mem::take(&mut st.pending);
                        st.checkpoints.extend(pending);
                    }
                    Ok(Ack {
                        durable: st.checkpoints.clone(),
                        stats: WriteStats::default(),
                    })
                }
            }
        };
        self.notify();
        result
    }

    fn revoke(&mut self, partitions: &[TopicPartition]) {
        let mut st = self.state.lock().expect("not poisoned");
        st.pending.retain(|tp, _| !partitions.contains(tp));
    }
}

impl MemorySink {
    fn write_locked(&self, batch: &Batch) -> Result<Ack, SinkError> {
        let mut st = self.state.lock().expect("not poisoned");
        st.attempts += 1;
        for (tp, (_, last)) in batch.ranges() {
            let up_to = st.attempted_up_to.entry(tp).or_insert(last);
            *up_to = (*up_to).max(last);
        }
        if let Some(e) = self.injected_failure() {
            return Err(e);
        }
        // What this sink holds, buffered or durable, is where the next batch must continue.
        let mut held = st.checkpoints.clone();
        held.extend(st.pending.iter().map(|(tp, o)| (tp.clone(), *o)));
        let next = checkpoint::after_batch(self.name, &batch.ranges(), &held)?;
        let mut stats = WriteStats::default();
        for r in &batch.records {
            let c = r.coords();
            let tp = c.topic_partition();
            if c.offset < held.get(&tp).copied().unwrap_or(0) {
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
        if self.buffering {
            st.pending.extend(next);
        } else {
            st.checkpoints.extend(next);
        }
        let durable = batch
            .ranges()
            .into_keys()
            .filter_map(|tp| st.checkpoints.get(&tp).map(|o| (tp, *o)))
            .collect();
        Ok(Ack { durable, stats })
    }
}
