//! The Delta log over an in-memory store: what a table's snapshot keeps in memory.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use object_store::memory::InMemory;
use parquet::arrow::ArrowWriter;

use super::stats::DeltaFile;
use super::{DeltaLog, SNAPSHOT_STATS_BUDGET};
use crate::config::LakeConfig;
use crate::domain::TopicPartition;

/// A one-row Parquet file of `columns` integer columns (each gets statistics in the `add`).
fn wide_file(columns: usize, name: &str) -> DeltaFile {
    let fields: Vec<Field> = (0..columns)
        .map(|i| Field::new(format!("c{i}"), DataType::Int64, true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let arrays: Vec<ArrayRef> = (0..columns)
        .map(|i| Arc::new(Int64Array::from(vec![i as i64])) as ArrayRef)
        .collect();
    parquet_file(RecordBatch::try_new(schema, arrays).unwrap(), name)
}

/// `batch` as a Parquet file of the table, with the `add` the lake would commit for it.
fn parquet_file(batch: RecordBatch, name: &str) -> DeltaFile {
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buf, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    DeltaFile::from_parquet(
        &format!("date=2026-12-01/{name}"),
        "2026-12-01",
        &Bytes::from(buf),
    )
    .unwrap()
}

fn tp() -> TopicPartition {
    TopicPartition {
        topic: "t".into(),
        partition: 0,
    }
}

/// Kafka timestamps come from producers: a record stamped in year -5953 or 12000 is stored
/// like any other. Its file's statistics must still be ones deltalake reads back, or the
/// table's log stops taking commits (the poison-record test stalled the lake sink this way).
/// deltalake is the oracle: it parses every `add`'s statistics when it commits and loads.
#[tokio::test]
async fn timestamps_outside_four_digit_years_keep_the_log_readable() {
    let cfg = LakeConfig::default();
    let store = Arc::new(InMemory::new());
    let url = url::Url::parse("memory:///").unwrap();
    let mut log = DeltaLog::new(&cfg, store.clone(), url.clone()).unwrap();
    let dir = "table=public.stamps";
    let schema = Arc::new(Schema::new(vec![Field::new(
        "kafka_timestamp",
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        true,
    )]));
    let ms: [i64; 4] = [
        -250_000_000_000_000,
        1_764_547_200_000,
        320_000_000_000_000,
        -62_135_596_800_001,
    ];
    for (i, stamp) in ms.iter().enumerate() {
        let column = TimestampMicrosecondArray::from(vec![*stamp * 1000, 1_764_547_200_000_000])
            .with_timezone("UTC");
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(column)]).unwrap();
        let file = parquet_file(batch, &format!("t+0+{i}.parquet"));
        log.publish(
            &tp(),
            i as i64 + 1,
            vec![(dir.into(), "public.stamps".into(), file)],
        )
        .await
        .unwrap_or_else(|e| panic!("commit {i} ({stamp} ms): {e}"));
    }
    let mut fresh = DeltaLog::new(&cfg, store, url).unwrap();
    assert_eq!(
        fresh.recorded(dir, &tp()).await.unwrap(),
        Some(ms.len() as i64),
        "every commit landed and the log loads again"
    );
}

/// deltalake's post-commit snapshot keeps every file committed since the table was loaded;
/// the log reloads the table before that passes its budget, so a long run of commits to a
/// wide table holds a bounded number of files (kafka-delta-ingest#227: unbounded growth).
#[tokio::test]
async fn a_wide_tables_snapshot_holds_a_bounded_number_of_files() {
    let columns = 2_000;
    let cfg = LakeConfig::default();
    let store = Arc::new(InMemory::new());
    let mut log = DeltaLog::new(&cfg, store, url::Url::parse("memory:///").unwrap()).unwrap();
    let tp = tp();
    let dir = "table=public.wide";
    let most = SNAPSHOT_STATS_BUDGET.div_ceil(columns);
    let mut peak = 0;
    for commit in 0..(4 * most) {
        let file = wide_file(columns, &format!("t+0+{commit}.parquet"));
        log.publish(
            &tp,
            commit as i64 + 1,
            vec![(dir.into(), "public.wide".into(), file)],
        )
        .await
        .unwrap();
        peak = peak.max(log.files_held(dir));
    }
    assert!(peak > 0, "the snapshot gathers files between loads");
    assert!(
        peak <= most,
        "{peak} files held at once; at most {most} expected"
    );
    assert_eq!(
        log.recorded(dir, &tp).await.unwrap(),
        Some(4 * most as i64),
        "every commit landed"
    );
}
