//! `cdc_lake.route_progress`: each filter's output partition, watermark and live start per
//! source partition, read and advanced inside the route sink's transaction; and
//! `cdc_lake.route_attempts`, the count of produce attempts per source partition.

use std::collections::HashMap;

use tokio_postgres::{Client, Transaction};

use super::pg_err;
use crate::domain::TopicPartition;
use crate::sink::checkpoint::{split, to_offsets};
use crate::sink::SinkError;

/// A filter's progress on one source partition (`cdc_lake.route_progress`).
#[derive(Debug, Clone)]
pub(super) struct Progress {
    pub output_partition: i32,
    pub output_watermark: i64,
    pub live_from: i64,
}

pub(super) async fn load_progress(
    tx: &Transaction<'_>,
    consumer: &str,
    tps: &[TopicPartition],
) -> Result<HashMap<(String, TopicPartition), Progress>, SinkError> {
    let (topics, partitions) = split(tps);
    let rows = tx
        .query(
            "SELECT p.filter_id, p.kafka_topic, p.kafka_partition, p.output_partition,
                    p.output_watermark, p.live_from
               FROM cdc_lake.route_progress p
               JOIN unnest($2::text[], $3::int[]) AS w(t, n)
                 ON p.kafka_topic = w.t AND p.kafka_partition = w.n
              WHERE p.consumer = $1",
            &[&consumer, &topics, &partitions],
        )
        .await
        .map_err(pg_err("reading route progress"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                (
                    r.get(0),
                    TopicPartition::new(r.get::<_, String>(1), r.get(2)),
                ),
                Progress {
                    output_partition: r.get(3),
                    output_watermark: r.get(4),
                    live_from: r.get(5),
                },
            )
        })
        .collect())
}

pub(super) async fn advance_watermarks(
    tx: &Transaction<'_>,
    consumer: &str,
    watermarks: &HashMap<(String, TopicPartition), i64>,
) -> Result<(), SinkError> {
    if watermarks.is_empty() {
        return Ok(());
    }
    let mut filters = Vec::new();
    let mut topics = Vec::new();
    let mut partitions = Vec::new();
    let mut marks = Vec::new();
    for ((f, tp), w) in watermarks {
        filters.push(f.as_str());
        topics.push(tp.topic.as_str());
        partitions.push(tp.partition);
        marks.push(*w);
    }
    tx.execute(
        "UPDATE cdc_lake.route_progress p
            SET output_watermark = GREATEST(p.output_watermark, w.m), updated_at = now()
           FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[]) AS w(f, t, n, m)
          WHERE p.consumer = $1 AND p.filter_id = w.f AND p.kafka_topic = w.t AND p.kafka_partition = w.n",
        &[&consumer, &filters, &topics, &partitions, &marks],
    )
    .await
    .map_err(pg_err("advancing route watermarks"))?;
    Ok(())
}

/// The stored attempt count of each of `tps` (0 where none was made).
pub(super) async fn load_attempts(
    tx: &Transaction<'_>,
    consumer: &str,
    tps: &[TopicPartition],
) -> Result<HashMap<TopicPartition, i64>, SinkError> {
    let (topics, partitions) = split(tps);
    let rows = tx
        .query(
            "SELECT a.kafka_topic, a.kafka_partition, a.attempt
               FROM cdc_lake.route_attempts a
               JOIN unnest($2::text[], $3::int[]) AS w(t, n)
                 ON a.kafka_topic = w.t AND a.kafka_partition = w.n
              WHERE a.consumer = $1",
            &[&consumer, &topics, &partitions],
        )
        .await
        .map_err(pg_err("reading route attempts"))?;
    let mut out: HashMap<TopicPartition, i64> = tps.iter().map(|tp| (tp.clone(), 0)).collect();
    out.extend(to_offsets(&rows));
    Ok(out)
}

/// Counts an attempt on each of `tps` and commits it at once (`client` is not the one whose
/// transaction holds the checkpoint lock): the count survives a crash after the produce.
/// Returns the new counts.
pub(super) async fn count_attempts(
    client: &Client,
    consumer: &str,
    tps: &[TopicPartition],
) -> Result<HashMap<TopicPartition, i64>, SinkError> {
    let (topics, partitions) = split(tps);
    let rows = client
        .query(
            "INSERT INTO cdc_lake.route_attempts AS a (consumer, kafka_topic, kafka_partition, attempt)
             SELECT $1, t, n, 1 FROM unnest($2::text[], $3::int[]) AS w(t, n)
             ON CONFLICT (consumer, kafka_topic, kafka_partition)
             DO UPDATE SET attempt = a.attempt + 1
             RETURNING kafka_topic, kafka_partition, attempt",
            &[&consumer, &topics, &partitions],
        )
        .await
        .map_err(pg_err("counting a route attempt"))?;
    Ok(to_offsets(&rows))
}
