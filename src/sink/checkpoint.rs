//! Checkpoint rows in `cdc_lake.checkpoints`, read and advanced inside the sink's own
//! transaction so that data and checkpoint commit together.

use std::collections::BTreeMap;

use tokio_postgres::{GenericClient, Transaction};

use super::{Offsets, SinkError};
use crate::domain::{LogBounds, TopicPartition};

fn pg_err<'a>(
    sink: &'static str,
    context: &'a str,
) -> impl FnOnce(tokio_postgres::Error) -> SinkError + 'a {
    move |source| SinkError::Postgres {
        sink,
        context: context.to_string(),
        source,
    }
}

/// Rows of (topic, partition, a bigint) by topic-partition.
pub(crate) fn to_offsets(rows: &[tokio_postgres::Row]) -> Offsets {
    rows.iter()
        .map(|r| {
            (
                TopicPartition::new(r.get::<_, String>(0), r.get(1)),
                r.get(2),
            )
        })
        .collect()
}

/// The checkpoint after a batch: one past its last offset per partition, never below what was
/// stored.
///
/// A checkpoint only moves over records this sink stored or accounted for, so the batch must
/// continue from the stored checkpoint: its start (see `Batch::starts`) at or below it. A batch
/// that starts above it would leave the records in between in no sink; that is refused with
/// [`SinkError::CheckpointGap`], never papered over (kafka-delta-ingest's
/// `InconsistentStoredOffsets`).
pub fn after_batch(
    sink: &'static str,
    ranges: &BTreeMap<TopicPartition, (i64, i64)>,
    stored: &Offsets,
) -> Result<BTreeMap<TopicPartition, i64>, SinkError> {
    ranges
        .iter()
        .map(|(tp, (start, last))| {
            let stored = stored.get(tp).copied().unwrap_or(0);
            if *start > stored {
                return Err(SinkError::CheckpointGap {
                    sink,
                    tp: tp.clone(),
                    stored,
                    batch_start: *start,
                });
            }
            Ok((tp.clone(), (last + 1).max(stored)))
        })
        .collect()
}

/// The topics and partitions of `tps`, as the two arrays an `unnest($n::text[], $m::int[])`
/// takes.
pub(crate) fn split(tps: &[TopicPartition]) -> (Vec<&str>, Vec<i32>) {
    tps.iter()
        .map(|tp| (tp.topic.as_str(), tp.partition))
        .unzip()
}

/// Reads stored checkpoints without locking.
pub async fn load(
    client: &impl GenericClient,
    sink: &'static str,
    consumer: &str,
    tps: &[TopicPartition],
) -> Result<Offsets, SinkError> {
    let (topics, partitions) = split(tps);
    let rows = client
        .query(
            "SELECT c.kafka_topic, c.kafka_partition, c.next_offset
               FROM cdc_lake.checkpoints c
               JOIN unnest($3::text[], $4::int[]) AS w(t, p)
                 ON c.kafka_topic = w.t AND c.kafka_partition = w.p
              WHERE c.sink = $1 AND c.consumer = $2",
            &[&sink, &consumer, &topics, &partitions],
        )
        .await
        .map_err(pg_err(sink, "reading checkpoints"))?;
    Ok(to_offsets(&rows))
}

/// Locks the checkpoint rows of `tps` for the rest of the transaction and returns them
/// (0 where none was stored). A second writer for the same partition (a consumer that lost the
/// partition but has not noticed yet) waits here, then sees the advanced checkpoint and skips.
pub async fn lock(
    tx: &Transaction<'_>,
    sink: &'static str,
    consumer: &str,
    tps: &[TopicPartition],
) -> Result<Offsets, SinkError> {
    let mut sorted = tps.to_vec();
    sorted.sort();
    let (topics, partitions) = split(&sorted);
    tx.execute(
        "INSERT INTO cdc_lake.checkpoints (sink, consumer, kafka_topic, kafka_partition, next_offset)
         SELECT $1, $2, t, p, 0 FROM unnest($3::text[], $4::int[]) AS w(t, p)
         ON CONFLICT DO NOTHING",
        &[&sink, &consumer, &topics, &partitions],
    )
    .await
    .map_err(pg_err(sink, "creating checkpoint rows"))?;
    let rows = tx
        .query(
            "SELECT c.kafka_topic, c.kafka_partition, c.next_offset
               FROM cdc_lake.checkpoints c
               JOIN unnest($3::text[], $4::int[]) AS w(t, p)
                 ON c.kafka_topic = w.t AND c.kafka_partition = w.p
              WHERE c.sink = $1 AND c.consumer = $2
              ORDER BY c.kafka_topic, c.kafka_partition
                FOR UPDATE OF c",
            &[&sink, &consumer, &topics, &partitions],
        )
        .await
        .map_err(pg_err(sink, "locking checkpoints"))?;
    Ok(to_offsets(&rows))
}

/// Moves checkpoints forward (never backwards) inside the transaction.
pub async fn advance(
    tx: &Transaction<'_>,
    sink: &'static str,
    consumer: &str,
    next: &BTreeMap<TopicPartition, i64>,
) -> Result<(), SinkError> {
    let (tps, offsets): (Vec<TopicPartition>, Vec<i64>) =
        next.iter().map(|(tp, o)| (tp.clone(), *o)).unzip();
    let (topics, partitions) = split(&tps);
    tx.execute(
        "UPDATE cdc_lake.checkpoints c
            SET next_offset = w.n, updated_at = now()
           FROM unnest($3::text[], $4::int[], $5::bigint[]) AS w(t, p, n)
          WHERE c.sink = $1 AND c.consumer = $2
            AND c.kafka_topic = w.t AND c.kafka_partition = w.p
            AND c.next_offset < w.n",
        &[&sink, &consumer, &topics, &partitions, &offsets],
    )
    .await
    .map_err(pg_err(sink, "advancing checkpoints"))?;
    Ok(())
}

/// Moves a checkpoint that is past its partition's log end back to the log's start and records
/// the reset in `cdc_lake.log_resets`, inside the sink's transaction. Only a checkpoint still at
/// `stale` moves: a concurrent owner may have taken the partition up first. Returns the
/// checkpoint stored afterwards, and whether this call moved it.
pub async fn rebase(
    tx: &Transaction<'_>,
    sink: &'static str,
    consumer: &str,
    tp: &TopicPartition,
    stale: i64,
    log: LogBounds,
) -> Result<(i64, bool), SinkError> {
    let moved = tx
        .query_opt(
            "UPDATE cdc_lake.checkpoints
                SET next_offset = $5, updated_at = now()
              WHERE sink = $1 AND consumer = $2 AND kafka_topic = $3 AND kafka_partition = $4
                AND next_offset = $6
             RETURNING next_offset",
            &[
                &sink,
                &consumer,
                &tp.topic,
                &tp.partition,
                &log.start,
                &stale,
            ],
        )
        .await
        .map_err(pg_err(
            sink,
            "moving a checkpoint back to the start of a new log",
        ))?;
    if moved.is_none() {
        let now = load(tx, sink, consumer, std::slice::from_ref(tp)).await?;
        return Ok((now.get(tp).copied().unwrap_or(0), false));
    }
    tx.execute(
        "INSERT INTO cdc_lake.log_resets
             (sink, consumer, kafka_topic, kafka_partition, stale_offset, log_start, log_end)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &sink,
            &consumer,
            &tp.topic,
            &tp.partition,
            &stale,
            &log.start,
            &log.end,
        ],
    )
    .await
    .map_err(pg_err(sink, "recording a log reset"))?;
    Ok((log.start, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(start: i64, last: i64) -> BTreeMap<TopicPartition, (i64, i64)> {
        BTreeMap::from([(TopicPartition::new("t", 0), (start, last))])
    }

    fn stored(next: i64) -> Offsets {
        Offsets::from([(TopicPartition::new("t", 0), next)])
    }

    #[test]
    fn a_batch_that_continues_from_the_checkpoint_advances_it() {
        let tp = TopicPartition::new("t", 0);
        // Exactly at the checkpoint, and overlapping it (redelivery after a crash).
        assert_eq!(
            after_batch("raw", &ranges(5, 9), &stored(5)).unwrap()[&tp],
            10
        );
        assert_eq!(
            after_batch("raw", &ranges(0, 9), &stored(5)).unwrap()[&tp],
            10
        );
        // Entirely below it: already stored, the checkpoint stays.
        assert_eq!(
            after_batch("raw", &ranges(0, 3), &stored(5)).unwrap()[&tp],
            5
        );
        // Nothing stored yet, from the beginning.
        assert_eq!(
            after_batch("raw", &ranges(0, 2), &Offsets::new()).unwrap()[&tp],
            3
        );
    }

    #[test]
    fn a_batch_past_the_checkpoint_is_a_typed_error() {
        let err = after_batch("state", &ranges(15, 20), &stored(5)).unwrap_err();
        assert!(
            matches!(
                err,
                SinkError::CheckpointGap {
                    stored: 5,
                    batch_start: 15,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.to_string(), "state: t[0] has a gap: the stored checkpoint is 5 but the batch continues from 15; not advancing past records this sink never stored");
        let err = after_batch("raw", &ranges(3, 3), &Offsets::new()).unwrap_err();
        assert!(matches!(err, SinkError::CheckpointGap { stored: 0, .. }));
    }
}
