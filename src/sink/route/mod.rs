//! The route sink: changes that match a filter of `routes.yaml` go to the filter's Kafka topic,
//! with the contract of the other sinks (no loss, no duplicate).
//!
//! How (docs/routing.md):
//! - The checkpoint per source partition is a row of `cdc_lake.checkpoints`, locked for the
//!   whole batch: the batch's records are produced and **acknowledged while the lock is held**,
//!   then the checkpoint advances and commits. A second writer of the same partition (a pod
//!   that lost it in a rebalance but has not noticed, a paused zombie) waits on the lock, then
//!   sees the advanced checkpoint and skips. This is the fence the dev broker's transactions
//!   do not give (ENVIRONMENT.md: tansu does not fence zombie producers).
//! - Every routed record carries its source coordinates and filter id in headers. A crash
//!   between the produce and the commit leaves records in the output that the checkpoint does
//!   not cover; the next owner reads each output partition from the watermark stored with the
//!   checkpoint (`cdc_lake.route_progress`) to its end and does not route those again.
//! - A source partition's changes go to the same partition number of the output topic (modulo
//!   its partition count), so the order of a key's changes is kept.

mod produce;
mod progress;
mod schemas;
mod topics;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use rdkafka::producer::FutureProducer;
use tokio_postgres::Client;

pub(crate) use produce::{produce, producer, Outgoing};
use progress::{advance_watermarks, count_attempts, load_attempts, load_progress, Progress};
pub(crate) use schemas::OutputSchemas;
pub(crate) use topics::OutputTopics;

use super::{checkpoint, Ack, Offsets, Sink, SinkError, WriteStats};
use crate::batch::Batch;
use crate::config::{KafkaConfig, PostgresConfig, RoutesConfig};
use crate::domain::TopicPartition;
use crate::envelope::ChangeEvent;
use crate::route::condition::SourceFields;
use crate::route::{avro, output, Filter, OutputFormat, Routes, Verdict};
use crate::telemetry::METRICS;
use prometheus::IntCounter;

pub const NAME: &str = "route";

fn pg_err(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
    let context = context.into();
    move |source| SinkError::Postgres {
        sink: NAME,
        context,
        source,
    }
}

pub struct RouteSink {
    routes: Arc<Routes>,
    pg: PostgresConfig,
    consumer: String,
    client: Option<Client>,
    /// A second connection, for the attempt counts that must commit before the produce while
    /// `client`'s transaction holds the checkpoint lock.
    attempts_client: Option<Client>,
    producer: FutureProducer,
    outputs: Arc<Mutex<OutputTopics>>,
    /// Per source partition: the checkpoint this sink committed last. While it equals the
    /// stored one, no other writer has been there since, and nothing of an unfinished batch
    /// can be in the outputs. Otherwise the outputs' tails are read first.
    committed: HashMap<TopicPartition, i64>,
    /// Per source partition: the attempt count (`cdc_lake.route_attempts`) as this sink left it.
    /// A stored count that differs means another writer attempted a batch since, which may have
    /// reached the outputs without a commit, even where the checkpoint has not moved.
    attempts: HashMap<TopicPartition, i64>,
    /// Records of another writer's unfinished batch that a tail read found in the outputs
    /// (filter, source partition, source offset), past the end of the batch that read them.
    /// Once this sink commits that batch its partitions no longer look unsure, so its later
    /// batches skip these by this set instead (a restarted pod's batches need not end where the
    /// crashed one's did). Dropped as the checkpoint passes them.
    found_ahead: HashSet<(String, TopicPartition, i64)>,
    /// (filter, source partition) pairs whose progress row is known to exist.
    ensured: HashSet<(usize, TopicPartition)>,
    /// Each filter's counters, by its position in the file.
    metrics: Vec<FilterMetrics>,
    /// The registered schemas of `format: avro` filters (boxed: the registry client is large,
    /// and most deployments route JSON).
    schemas: Box<OutputSchemas>,
}

/// One filter's metrics (`cdc_lake_route_*_total{filter}`), looked up once.
struct FilterMetrics {
    matched: IntCounter,
    routed: IntCounter,
    errors: IntCounter,
}

impl RouteSink {
    pub fn new(
        routes: Arc<Routes>,
        kafka: &KafkaConfig,
        config: &RoutesConfig,
        pg: PostgresConfig,
        consumer: impl Into<String>,
    ) -> Result<Self, SinkError> {
        let producer = producer(kafka, "cdc-lake-route")?;
        Ok(Self {
            pg,
            consumer: consumer.into(),
            client: None,
            attempts_client: None,
            producer,
            outputs: Arc::new(Mutex::new(OutputTopics::new(kafka, config)?)),
            schemas: Box::new(OutputSchemas::new(kafka.schema_registry.as_ref())?),
            committed: HashMap::new(),
            attempts: HashMap::new(),
            found_ahead: HashSet::new(),
            ensured: HashSet::new(),
            metrics: routes
                .filters
                .iter()
                .map(|f| FilterMetrics {
                    matched: METRICS.route_matched.with_label_values(&[&f.id]),
                    routed: METRICS.route_routed.with_label_values(&[&f.id]),
                    errors: METRICS.route_errors.with_label_values(&[&f.id]),
                })
                .collect(),
            routes,
        })
    }

    async fn client(&mut self) -> Result<&mut Client, SinkError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(super::connect(&self.pg, NAME).await?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// Runs blocking librdkafka calls on the output topics off the async threads.
    async fn with_outputs<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut OutputTopics) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let outputs = self.outputs.clone();
        tokio::task::spawn_blocking(move || f(&mut outputs.lock().expect("not poisoned")))
            .await
            .expect("output topic calls do not panic")
    }

    /// Creates the missing progress rows of `tps` (committed before anything is produced, so
    /// that a crash in the first batch still leaves a watermark below its records): the output
    /// topic made sure of, its current end as the watermark, and the live route starting at
    /// the route checkpoint.
    async fn ensure_progress(&mut self, tps: &[TopicPartition]) -> Result<(), SinkError> {
        let mut missing: Vec<(usize, TopicPartition)> = Vec::new();
        for tp in tps {
            for (i, f) in self.routes.filters.iter().enumerate() {
                if f.may_read_topic(&tp.topic) && !self.ensured.contains(&(i, tp.clone())) {
                    missing.push((i, tp.clone()));
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let plan: Vec<(String, TopicPartition)> = missing
            .iter()
            .map(|(i, tp)| (self.routes.filters[*i].topic.clone(), tp.clone()))
            .collect();
        // Output partition and current end of each.
        let ends = self
            .with_outputs(move |o| {
                plan.into_iter()
                    .map(|(topic, tp)| {
                        let source = o.source_partitions(&tp.topic)?;
                        let n = o.ensure(&topic, source)?;
                        let partition = tp.partition % n;
                        Ok((
                            topic.clone(),
                            partition,
                            o.high_watermark(&topic, partition)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, SinkError>>()
            })
            .await?;
        let consumer = self.consumer.clone();
        let client = self.client().await?;
        let stored = checkpoint::load(&*client, NAME, &consumer, tps).await?;
        for ((i, tp), (topic, partition, end)) in missing.iter().zip(&ends) {
            let filter = &self.routes.filters[*i];
            let live_from = stored.get(tp).copied().unwrap_or(0);
            self.client
                .as_ref()
                .expect("connected above")
                .execute(
                    "INSERT INTO cdc_lake.route_progress
                         (consumer, filter_id, kafka_topic, kafka_partition, output_topic,
                          output_partition, output_watermark, live_from, backfill_watermark)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7)
                     ON CONFLICT DO NOTHING",
                    &[
                        &consumer,
                        &filter.id,
                        &tp.topic,
                        &tp.partition,
                        topic,
                        partition,
                        end,
                        &live_from,
                    ],
                )
                .await
                .map_err(pg_err(format!(
                    "creating the progress of filter {}",
                    filter.id
                )))?;
        }
        self.ensured.extend(missing);
        Ok(())
    }

    async fn write_inner(&mut self, batch: &Batch) -> Result<Ack, SinkError> {
        let ranges = batch.ranges();
        let tps: Vec<TopicPartition> = ranges.keys().cloned().collect();
        self.ensure_progress(&tps).await?;
        if self.attempts_client.as_ref().is_none_or(Client::is_closed) {
            self.attempts_client = Some(super::connect(&self.pg, NAME).await?);
        }
        let consumer = self.consumer.clone();
        let routes = self.routes.clone();
        let client = self.client.as_mut().expect("connected by ensure_progress");
        let tx = client.transaction().await.map_err(pg_err("beginning"))?;
        let stored = checkpoint::lock(&tx, NAME, &consumer, &tps).await?;
        let next = checkpoint::after_batch(NAME, &ranges, &stored)?;
        let progress = load_progress(&tx, &consumer, &tps).await?;
        let stored_attempts = load_attempts(&tx, &consumer, &tps).await?;

        // Partitions another writer (or an unfinished batch of ours) may have routed past the
        // stored checkpoint: what their outputs already hold. Another writer's batch shows as
        // a checkpoint this sink did not commit, or as an attempt it did not count.
        let unsure: Vec<TopicPartition> = tps
            .iter()
            .filter(|tp| {
                self.committed.get(*tp) != Some(&stored.get(*tp).copied().unwrap_or(0))
                    || self.attempts.get(*tp).copied().unwrap_or(0) != stored_attempts[*tp]
            })
            .cloned()
            .collect();
        let mut present: HashSet<(String, TopicPartition, i64)> = self.found_ahead.clone();
        if !unsure.is_empty() {
            let reads: Vec<(String, String, i32, i64, TopicPartition)> = progress
                .iter()
                .filter(|((_, tp), _)| unsure.contains(tp))
                .map(|((filter, tp), p)| {
                    let topic = routes
                        .get(filter)
                        .map(|f| f.topic.clone())
                        .unwrap_or_default();
                    (
                        filter.clone(),
                        topic,
                        p.output_partition,
                        p.output_watermark,
                        tp.clone(),
                    )
                })
                .filter(|(_, topic, ..)| !topic.is_empty())
                .collect();
            let found = {
                let outputs = self.outputs.clone();
                tokio::task::spawn_blocking(move || {
                    let o = outputs.lock().expect("not poisoned");
                    let mut found = Vec::new();
                    for (_, topic, partition, from, tp) in reads {
                        for r in o.routed_since(&topic, partition, from, &tp)? {
                            found.push((r.filter, tp.clone(), r.offset));
                        }
                    }
                    Ok::<_, SinkError>(found)
                })
                .await
                .expect("output reads do not panic")?
            };
            if !found.is_empty() {
                tracing::info!(
                    records = found.len(),
                    "route: records of an unfinished batch are already in the output topics; not routing them again"
                );
            }
            present.extend(found);
        }

        // Per source partition, each filter's progress by the filter's index.
        let mut by_filter: HashMap<&TopicPartition, Vec<Option<&Progress>>> = HashMap::new();
        for ((id, tp), p) in &progress {
            if let Some(i) = routes.filters.iter().position(|f| &f.id == id) {
                by_filter
                    .entry(tp)
                    .or_insert_with(|| vec![None; routes.filters.len()])[i] = Some(p);
            }
        }
        let mut stats = WriteStats::default();
        let filtered_at = Utc::now();
        self.schemas.forget_refusals();
        let mut sends: Vec<Outgoing> = Vec::new();
        let mut rejects: Vec<(&ChangeEvent, String, String)> = Vec::new();
        for r in &batch.records {
            let c = r.coords();
            let Some((tp, per_filter)) = by_filter.get_key_value(&c.topic_partition()) else {
                // No filter can take this topic: not routed.
                *stats.ignored.entry("not_routed").or_default() += 1;
                continue;
            };
            if c.offset < stored.get(*tp).copied().unwrap_or(0) {
                stats.already_stored += 1;
                continue;
            }
            let Some(e) = stats.change(r) else { continue };
            // The `source` block is parsed only if a condition reads it, once per change.
            let source = SourceFields::default();
            let mut rendered = output::Rendered::new(e);
            let mut routed_any = false;
            for (i, f) in routes.filters.iter().enumerate() {
                let counters = &self.metrics[i];
                match f.verdict(e, &source) {
                    Verdict::Skipped => {}
                    Verdict::Error(reason) => {
                        counters.errors.inc();
                        rejects.push((e, format!("route:{}", f.id), reason));
                    }
                    Verdict::Routed => {
                        let Some(p) = per_filter[i] else { continue };
                        if c.offset < p.live_from {
                            // Before the live route took this filter up: the backfill's.
                            continue;
                        }
                        counters.matched.inc();
                        routed_any = true;
                        if !present.is_empty()
                            && present.contains(&(f.id.clone(), (*tp).clone(), c.offset))
                        {
                            continue;
                        }
                        let value = match f.format {
                            OutputFormat::Json => rendered.value(f, filtered_at),
                            OutputFormat::Avro => {
                                avro_value(&mut self.schemas, f, e, filtered_at).await?
                            }
                        };
                        match value {
                            Ok(value) => {
                                sends.push(Outgoing::new(i, f, e, p.output_partition, value))
                            }
                            Err(reason) => {
                                counters.errors.inc();
                                rejects.push((e, format!("route:{}", f.id), reason));
                            }
                        }
                    }
                }
            }
            if routed_any {
                stats.written += 1;
            } else {
                *stats.ignored.entry("not_routed").or_default() += 1;
            }
        }

        // The attempt is counted and committed before anything is produced.
        let mut producing: Vec<TopicPartition> = sends
            .iter()
            .map(|s| s.event.coords.topic_partition())
            .collect();
        producing.sort();
        producing.dedup();
        let counted = if producing.is_empty() {
            HashMap::new()
        } else {
            let attempts = self.attempts_client.as_ref().expect("connected above");
            count_attempts(attempts, &consumer, &producing).await?
        };
        let produced = produce(&self.producer, &sends).await;
        let produced = match produced {
            Ok(p) => p,
            Err(e) => {
                // Some records may have landed: read the tails before the retry.
                for tp in &tps {
                    self.committed.remove(tp);
                }
                return Err(e);
            }
        };
        // The new watermark of each (filter, source partition) that produced: one past the
        // last acknowledged offset.
        let mut watermarks: HashMap<(String, TopicPartition), i64> = HashMap::new();
        let mut routed = vec![0u64; routes.filters.len()];
        for (s, offset) in sends.iter().zip(produced) {
            let key = (s.filter.id.clone(), s.event.coords.topic_partition());
            let w = watermarks.entry(key).or_insert(0);
            *w = (*w).max(offset + 1);
            routed[s.index] += 1;
        }
        for (counters, n) in self.metrics.iter().zip(routed) {
            counters.routed.inc_by(n);
        }
        advance_watermarks(&tx, &consumer, &watermarks).await?;
        for (e, stage, reason) in &rejects {
            super::record_reject(&tx, NAME, stage, e, reason).await?;
        }
        if !rejects.is_empty() {
            *stats.ignored.entry("rejected_by_route").or_default() += rejects.len() as u64;
            tracing::warn!(
                rejected = rejects.len(),
                "changes a filter could not be evaluated on went to cdc_raw.cdc_rejects (stage route:<filter>)"
            );
        }
        checkpoint::advance(&tx, NAME, &consumer, &next).await?;
        tx.commit().await.map_err(pg_err("committing"))?;
        self.committed
            .extend(next.iter().map(|(tp, o)| (tp.clone(), *o)));
        present.retain(|(_, tp, offset)| next.get(tp).is_none_or(|n| offset >= n));
        self.found_ahead = present;
        // Under the lock, every other writer's attempt was accounted for (the tails read) and
        // this commit covers it: the counts as they stand are this sink's now.
        for (tp, n) in stored_attempts {
            let n = counted.get(&tp).copied().unwrap_or(n);
            self.attempts.insert(tp, n);
        }
        Ok(Ack {
            durable: next.into_iter().collect(),
            stats,
        })
    }
}

/// The Avro value of `filter`'s record of `e`, built from the source record's own Avro bytes.
/// `Ok(Err(reason))`: this change cannot be routed in Avro (it came as JSON; the registry
/// refuses the output schema); `Err`: the registry cannot answer now.
async fn avro_value(
    schemas: &mut OutputSchemas,
    filter: &Filter,
    e: &ChangeEvent,
    filtered_at: chrono::DateTime<Utc>,
) -> Result<Result<Vec<u8>, String>, SinkError> {
    let Some(record) = e.avro.as_deref() else {
        return Ok(Err(avro::JSON_INPUT.into()));
    };
    let writer = &record.value_schema;
    let id = match schemas.id(&filter.topic, writer, filter.output).await? {
        Ok(id) => id,
        Err(reason) => return Ok(Err(reason)),
    };
    Ok(avro::value_of_record(
        filter,
        writer,
        &record.value,
        e.op,
        id,
        filtered_at,
    ))
}

impl Sink for RouteSink {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn checkpoints(&mut self, partitions: &[TopicPartition]) -> Result<Offsets, SinkError> {
        // A new assignment: whatever this sink knew of these partitions may be stale.
        for tp in partitions {
            self.committed.remove(tp);
        }
        self.ensure_progress(partitions).await?;
        let consumer = self.consumer.clone();
        let client = self.client().await?;
        checkpoint::load(&*client, NAME, &consumer, partitions).await
    }

    async fn write(&mut self, batch: &Batch) -> Result<Ack, SinkError> {
        if batch.is_empty() {
            return Ok(Ack::default());
        }
        let result = self.write_inner(batch).await;
        if result.is_err() {
            for tp in batch.ranges().keys() {
                self.committed.remove(tp);
            }
            if result.as_ref().is_err_and(SinkError::needs_reconnect) {
                self.client = None;
                self.attempts_client = None;
            }
        }
        result
    }

    async fn flush(&mut self, _force: bool) -> Result<Ack, SinkError> {
        // Every write is acknowledged and committed; nothing is buffered.
        Ok(Ack::default())
    }

    fn revoke(&mut self, partitions: &[TopicPartition]) {
        self.found_ahead
            .retain(|(_, tp, _)| !partitions.contains(tp));
        for tp in partitions {
            self.committed.remove(tp);
        }
    }
}
