//! A partition's log that started over under the sinks' checkpoints.
//!
//! The broker can lose what a checkpoint counted: a broker whose storage was lost (the dev
//! broker keeps topics in memory), a topic deleted and created again, an unclean leader election
//! that cut the log back. Its offsets then start over below the checkpoints, and each sink would
//! count every new record as one it already stored: silently lost. So when the pipeline takes a
//! partition, it asks the broker how far each partition's log reaches (`Committer::log_bounds`);
//! a sink whose checkpoint is past that end moves it back to the log's start
//! ([`Sink::rebase`]), in the sink's own transaction, and the start offset follows. A sink that
//! cannot keeps its checkpoint, and that is an error in the log and in
//! `cdc_lake_log_resets_total{outcome="kept"}`.
//!
//! Not seen here: a log that started over and has already grown past a checkpoint before the
//! pod takes the partition, which offsets alone cannot tell from the old log
//! (docs/delivery-semantics.md).

use std::collections::HashMap;
use std::time::Duration;

use super::{on_error, Backoff, Committer, Pipeline};
use crate::domain::{Offsets, TopicPartition};
use crate::sink::Sink;
use crate::telemetry::METRICS;

impl<C: Committer> Pipeline<C> {
    /// `per_sink` holds each sink's stored checkpoints of the partitions being taken; a
    /// checkpoint past its log's end is replaced by the one its sink stores after the rebase.
    pub(super) async fn take_up_logs_that_started_over(&mut self, per_sink: &mut [Offsets]) {
        let mut highest: HashMap<TopicPartition, i64> = HashMap::new();
        for (tp, c) in per_sink.iter().flatten() {
            let h = highest.entry(tp.clone()).or_insert(*c);
            *h = (*h).max(*c);
        }
        let highest: Vec<_> = highest.into_iter().filter(|(_, c)| *c > 0).collect();
        if highest.is_empty() {
            return;
        }
        // A ListOffsets round trip per partition, and a short read where the watermark is below
        // a checkpoint. It blocks this thread, once per assignment, while the poll thread waits
        // for the start offsets anyway.
        let bounds = self.committer.log_bounds(&highest);
        for (tp, log) in bounds {
            for (i, cps) in per_sink.iter_mut().enumerate() {
                let Some(stale) = cps.get(&tp).copied().filter(|c| *c > log.end) else {
                    continue;
                };
                let sink = &mut self.sinks[i];
                let name = sink.name();
                let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
                let rebased = loop {
                    match sink.rebase(&tp, stale, log).await {
                        Ok(r) => break r,
                        Err(e) => {
                            if !on_error(name, &e, &mut backoff, &self.readiness, &self.shutdown)
                                .await
                            {
                                return;
                            }
                        }
                    }
                };
                match rebased {
                    Some(next) => {
                        METRICS
                            .log_resets
                            .with_label_values(&[name, "rebased"])
                            .inc();
                        tracing::error!(
                            sink = name,
                            %tp,
                            checkpoint = stale,
                            log_start = log.start,
                            log_end = log.end,
                            resumes_at = next,
                            "the partition's log started over below this sink's checkpoint (lost by the broker, or the topic was created again): the sink takes up the new log from its start (cdc_lake.log_resets)"
                        );
                        cps.insert(tp.clone(), next);
                    }
                    None => {
                        METRICS.log_resets.with_label_values(&[name, "kept"]).inc();
                        tracing::error!(
                            sink = name,
                            %tp,
                            checkpoint = stale,
                            log_start = log.start,
                            log_end = log.end,
                            "the partition's log started over below this sink's checkpoint, and this sink cannot take up a new log: it does not store the new log's records below its checkpoint (docs/delivery-semantics.md, \"A log that starts over\")"
                        );
                    }
                }
            }
        }
    }
}
