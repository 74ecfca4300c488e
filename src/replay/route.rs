//! `cdc-replay --target route:<filter>`: routes a filter's history from the raw log (or the
//! lake) into its topic, so a new consumer gets its past changes.
//!
//! Per source partition, the live route and the backfill split the offsets at the filter's
//! `live_from`: the backfill routes the selected changes below it, the live route those at or
//! above it, so no change is routed by both. Each chunk takes the route checkpoint's lock like a
//! live batch, produces, awaits every acknowledgement, and commits `backfill_next` with its own
//! watermark; a rerun (after a crash too) continues there and first reads the output above that
//! watermark, so a change is never routed twice.

use std::collections::HashSet;
use std::time::Instant;

use chrono::Utc;

use super::error::Context;
use super::route_avro::AvroHistory;
use super::{Reader, ReplayArgs, ReplayError, ReplayResult, Selection, SourceKind};
use crate::config::Config;
use crate::domain::TopicPartition;
use crate::envelope::Decoded;
use crate::route::condition::SourceFields;
use crate::route::{OutputFormat, Routes, Verdict};
use crate::sink::checkpoint;
use crate::sink::route::{produce, producer, Outgoing, OutputTopics, NAME};

/// What a backfill did.
#[derive(Debug, Default)]
pub struct BackfillSummary {
    pub read: u64,
    pub routed: u64,
    /// Found already in the topic (a rerun after a crash) and not routed again.
    pub already_routed: u64,
    /// At or above the live route's start: the live route's.
    pub left_to_live: u64,
    pub errors: u64,
}

impl std::fmt::Display for BackfillSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "backfill: {} changes read, {} routed, {} already in the topic, {} left to the live route, {} not routable (in cdc_raw.cdc_rejects)",
            self.read, self.routed, self.already_routed, self.left_to_live, self.errors
        )
    }
}

/// Runs the backfill of filter `filter_id` over the selection of `args`.
pub async fn run(
    config: &Config,
    args: &ReplayArgs,
    filter_id: &str,
) -> ReplayResult<BackfillSummary> {
    let sel = args.selection();
    sel.validate()?;
    if !config.routes.enabled() {
        return Err(ReplayError::BadArguments(
            "--target route:<filter> needs routes.file in the config".into(),
        ));
    }
    let routes = Routes::load(std::path::Path::new(&config.routes.file)).map_err(|errors| {
        ReplayError::BadArguments(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let Some(filter) = routes.get(filter_id).cloned() else {
        return Err(ReplayError::BadArguments(format!(
            "{} has no filter {filter_id:?} (filters: {})",
            config.routes.file,
            routes
                .filters
                .iter()
                .map(|f| f.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    if args.rebuild || args.dry_run {
        return Err(ReplayError::BadArguments(
            "--rebuild and --dry-run apply to state targets, not to a route".into(),
        ));
    }
    // Avro is routed from the bytes as received, which the raw log keeps and the lake not.
    let mut avro = match filter.format {
        OutputFormat::Json => None,
        OutputFormat::Avro if args.source == SourceKind::Raw => Some(AvroHistory::new(config)?),
        OutputFormat::Avro => {
            return Err(ReplayError::BadArguments(format!(
                "filter {filter_id:?} has format avro, which is routed from the Avro bytes the raw log keeps: use --source raw"
            )))
        }
    };
    let consumer = config.kafka.checkpoint_name().to_string();
    let reader = Reader::open(config, args.source).await?;
    let plan = reader.plan(&sel).await?;
    let mut client = crate::db::connect(&config.postgres, "cdc-replay route").await?;
    crate::db::migrate(&mut client).await?;
    let producer = producer(&config.kafka, "cdc-replay-route")?;
    let mut outputs = OutputTopics::new(&config.kafka, &config.routes)?;
    eprintln!(
        "cdc-replay: backfilling filter {filter_id:?} into {} from the {} ({sel}), {} partition(s)",
        filter.topic,
        args.source,
        plan.partitions.len()
    );
    let started = Instant::now();
    let mut summary = BackfillSummary::default();
    for tp in plan.partitions.keys() {
        let source_partitions = outputs.source_partitions(&tp.topic)?;
        let n = outputs.ensure(&filter.topic, source_partitions)?;
        let output_partition = tp.partition % n;
        let end = outputs.high_watermark(&filter.topic, output_partition)?;
        // The live route starts this filter at its checkpoint; where it has not run, at the
        // end of what this backfill can route.
        let route_checkpoint = checkpoint::load(&client, NAME, &consumer, std::slice::from_ref(tp))
            .await?
            .get(tp)
            .copied()
            .unwrap_or(0);
        let covered = reader.covered(config, tp).await?;
        client
            .execute(
                "INSERT INTO cdc_lake.route_progress
                     (consumer, filter_id, kafka_topic, kafka_partition, output_topic, output_partition,
                      output_watermark, live_from, backfill_watermark)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7)
                 ON CONFLICT DO NOTHING",
                &[&consumer, &filter.id, &tp.topic, &tp.partition, &filter.topic, &output_partition, &end, &route_checkpoint.max(covered)],
            )
            .await
            .context(format!("creating the route progress of {tp}"))?;
        let row = client
            .query_one(
                "SELECT live_from, backfill_next FROM cdc_lake.route_progress
                  WHERE consumer = $1 AND filter_id = $2 AND kafka_topic = $3 AND kafka_partition = $4",
                &[&consumer, &filter.id, &tp.topic, &tp.partition],
            )
            .await
            .context(format!("reading the route progress of {tp}"))?;
        let (live_from, done): (i64, i64) = (row.get(0), row.get(1));
        let from = sel.from_offset.max(done);
        let to = sel
            .to_offset
            .map_or(live_from - 1, |t| t.min(live_from - 1));
        if from > to {
            eprintln!("cdc-replay: {tp}: nothing to backfill (live route from {live_from}, backfilled to {done})");
            continue;
        }
        if done > sel.from_offset {
            eprintln!(
                "cdc-replay: {tp}: routed below {done} by an earlier backfill; continuing there"
            );
        }
        let part = Selection {
            topic: Some(tp.topic.clone()),
            partition: Some(tp.partition),
            from_offset: from,
            to_offset: Some(to),
            until: sel.until,
        };
        let mut chunks = reader.read(config, &part).await?;
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk?;
            backfill_chunk(
                &mut client,
                &producer,
                &outputs,
                &consumer,
                &filter,
                tp,
                output_partition,
                live_from,
                &chunk,
                avro.as_mut(),
                &mut summary,
            )
            .await?;
            eprintln!(
                "cdc-replay: {tp}: {} read, {} routed ({:.0} changes/s)",
                summary.read,
                summary.routed,
                summary.read as f64 / started.elapsed().as_secs_f64().max(1e-3)
            );
        }
        // Everything selected up to the live start is routed: a later run starts there.
        if sel.until.is_none() && sel.to_offset.is_none_or(|t| t >= live_from - 1) {
            client
                .execute(
                    "UPDATE cdc_lake.route_progress SET backfill_next = GREATEST(backfill_next, $5), updated_at = now()
                      WHERE consumer = $1 AND filter_id = $2 AND kafka_topic = $3 AND kafka_partition = $4",
                    &[&consumer, &filter.id, &tp.topic, &tp.partition, &live_from],
                )
                .await
                .context(format!("recording the backfill of {tp}"))?;
        }
    }
    Ok(summary)
}

/// Routes one chunk under the route checkpoint's lock and commits how far the backfill got.
#[allow(clippy::too_many_arguments)]
async fn backfill_chunk(
    client: &mut tokio_postgres::Client,
    producer: &rdkafka::producer::FutureProducer,
    outputs: &OutputTopics,
    consumer: &str,
    filter: &crate::route::Filter,
    tp: &TopicPartition,
    output_partition: i32,
    live_from: i64,
    chunk: &[Decoded],
    mut avro: Option<&mut AvroHistory>,
    summary: &mut BackfillSummary,
) -> ReplayResult<()> {
    let tx = client.transaction().await.context("beginning")?;
    checkpoint::lock(&tx, NAME, consumer, std::slice::from_ref(tp)).await?;
    let watermark: i64 = tx
        .query_one(
            "SELECT backfill_watermark FROM cdc_lake.route_progress
              WHERE consumer = $1 AND filter_id = $2 AND kafka_topic = $3 AND kafka_partition = $4",
            &[&consumer, &filter.id, &tp.topic, &tp.partition],
        )
        .await
        .context("reading the backfill watermark")?
        .get(0);
    // A run that crashed before its commit may have left records above the watermark.
    let present: HashSet<i64> = outputs
        .routed_since(&filter.topic, output_partition, watermark, tp)?
        .into_iter()
        .filter(|r| r.filter == filter.id)
        .map(|r| r.offset)
        .collect();
    let filtered_at = Utc::now();
    let avro_bytes = match (&mut avro, chunk.first(), chunk.last()) {
        (Some(history), Some(first), Some(last)) => {
            history
                .chunk(&tx, tp, first.coords().offset, last.coords().offset)
                .await?
        }
        _ => Default::default(),
    };
    let mut sends = Vec::new();
    let mut rejects = Vec::new();
    let mut last = None;
    for d in chunk {
        let c = d.coords();
        last = Some(c.offset);
        let Decoded::Change(e) = d else { continue };
        summary.read += 1;
        if c.offset >= live_from {
            summary.left_to_live += 1;
            continue;
        }
        let value = match filter.verdict(e, &SourceFields::default()) {
            Verdict::Skipped => continue,
            Verdict::Error(reason) => Err(reason),
            Verdict::Routed if present.contains(&c.offset) => {
                summary.already_routed += 1;
                continue;
            }
            Verdict::Routed => match avro.as_deref_mut() {
                None => crate::route::output::value(filter, e, filtered_at),
                Some(history) => {
                    history
                        .value(filter, e, avro_bytes.get(&c.offset), filtered_at)
                        .await?
                }
            },
        };
        match value {
            Ok(value) => sends.push(Outgoing::new(0, filter, e, output_partition, value)),
            Err(reason) => rejects.push((e, reason)),
        }
    }
    // Changes the filter cannot be evaluated on, or routed in its format: in the rejects, with
    // the reason, committed with the chunk (a rerun starts after it).
    let stage = format!("route:{}", filter.id);
    for (e, reason) in &rejects {
        crate::sink::record_reject(&tx, NAME, &stage, e, reason).await?;
    }
    summary.errors += rejects.len() as u64;
    let offsets = produce(producer, &sends).await?;
    summary.routed += offsets.len() as u64;
    let new_watermark = offsets.iter().max().map_or(watermark, |o| o + 1);
    if let Some(last) = last {
        tx.execute(
            "UPDATE cdc_lake.route_progress
                SET backfill_next = GREATEST(backfill_next, $5), backfill_watermark = GREATEST(backfill_watermark, $6),
                    updated_at = now()
              WHERE consumer = $1 AND filter_id = $2 AND kafka_topic = $3 AND kafka_partition = $4",
            &[&consumer, &filter.id, &tp.topic, &tp.partition, &(last + 1), &new_watermark],
        )
        .await
        .context("recording backfill progress")?;
    }
    tx.commit().await.context("committing backfill progress")?;
    Ok(())
}

/// The filter id of a `--target route:<id>`.
pub fn route_target(target: &str) -> Option<&str> {
    target.strip_prefix("route:")
}
