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

/// The Delta log entries of a table, parsed from the store as the Delta protocol lays them
/// out (`_delta_log/<version>.json`, one action per line): the independent reading.
async fn log_entries(store: &InMemory, dir: &str) -> Vec<Vec<serde_json::Value>> {
    use object_store::ObjectStore;
    let mut out = Vec::new();
    for version in 0.. {
        let path = object_store::path::Path::from(format!(
            "cdc_events/{dir}/_delta_log/{version:020}.json"
        ));
        let Ok(got) = store.get(&path).await else {
            break;
        };
        let text = String::from_utf8(got.bytes().await.unwrap().to_vec()).unwrap();
        out.push(
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        );
    }
    out
}

/// A flush that rolls many partitions lands one Delta commit per table, not one per
/// partition (256 partitions made 253 commits of a one-table lake, and the pod's memory grew
/// with them to 450 MB). Each partition's files are in it once, with its own txn at the
/// newest of its commits that touched the table; a republish of the same commits by a
/// restarted pod adds nothing.
#[tokio::test]
async fn many_partitions_land_in_one_commit_per_table_each_once() {
    let cfg = LakeConfig::default();
    let store = Arc::new(InMemory::new());
    let url = url::Url::parse("memory:///").unwrap();
    let part = |p: i32| TopicPartition {
        topic: "t".into(),
        partition: p,
    };
    // Two manifest commits per partition; table b only in the odd partitions' first commits.
    let mut commits = Vec::new();
    for p in 0..8 {
        for (round, next) in [(0, 10), (1, 20)] {
            let mut files = vec![(
                "table=public.a".to_string(),
                "public.a".to_string(),
                wide_file(3, &format!("t+{p}+{round}.parquet")),
            )];
            if p % 2 == 1 && round == 0 {
                files.push((
                    "table=public.b".into(),
                    "public.b".into(),
                    wide_file(2, &format!("t+{p}+{round}.parquet")),
                ));
            }
            commits.push((part(p), next, files));
        }
    }
    let mut log = DeltaLog::new(&cfg, store.clone(), url.clone()).unwrap();
    log.publish_many(commits.clone()).await.unwrap();

    let a = log_entries(&store, "table=public.a").await;
    let b = log_entries(&store, "table=public.b").await;
    assert_eq!((a.len(), b.len()), (1, 1), "one Delta commit per table");
    let count = |entries: &[serde_json::Value], action: &str| {
        entries.iter().filter(|e| e.get(action).is_some()).count()
    };
    assert_eq!((count(&a[0], "add"), count(&b[0], "add")), (16, 4));
    let txns = |entries: &[serde_json::Value]| -> Vec<(String, i64)> {
        let mut t: Vec<(String, i64)> = entries
            .iter()
            .filter_map(|e| e.get("txn"))
            .map(|t| {
                (
                    t["appId"].as_str().unwrap().to_string(),
                    t["version"].as_i64().unwrap(),
                )
            })
            .collect();
        t.sort();
        t
    };
    let expected_a: Vec<(String, i64)> = (0..8).map(|p| (format!("cdc-lake/t/{p}"), 20)).collect();
    let expected_b: Vec<(String, i64)> = [1, 3, 5, 7]
        .iter()
        .map(|p| (format!("cdc-lake/t/{p}"), 10))
        .collect();
    assert_eq!(txns(&a[0]), expected_a);
    assert_eq!(txns(&b[0]), expected_b);

    // A restarted pod republishing all of it, plus one new commit of partition 0: only the
    // new files land.
    let mut fresh = DeltaLog::new(&cfg, store.clone(), url).unwrap();
    commits.push((
        part(0),
        30,
        vec![(
            "table=public.a".into(),
            "public.a".into(),
            wide_file(3, "t+0+2.parquet"),
        )],
    ));
    fresh.publish_many(commits).await.unwrap();
    let a = log_entries(&store, "table=public.a").await;
    assert_eq!(log_entries(&store, "table=public.b").await.len(), 1);
    assert_eq!(a.len(), 2, "one more commit, for the new files only");
    assert_eq!(
        count(&a[1], "add"),
        1,
        "only partition 0's commit past offset 20"
    );
    assert_eq!(txns(&a[1]), vec![("cdc-lake/t/0".to_string(), 30)]);
}
