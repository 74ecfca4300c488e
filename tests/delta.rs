//! The lake as Delta tables, read by the `deltalake` Python package (an independent reader of
//! the Delta log): each offset exactly once in the current snapshot, time travel to the version
//! after a first run showing exactly that run's offsets, and a column added in a second run
//! readable in both versions. Local lake and S3 (moto).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `tests/delta_read.py` on the table of `public.orders`.
fn delta_read(lake: &LakeTarget, extra: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/delta_read.py");
    let mut cmd = Command::new(python());
    cmd.arg(script);
    match lake {
        LakeTarget::Local(dir) => {
            cmd.arg(dir.join("cdc_events/table=public.orders"));
        }
        LakeTarget::S3 { prefix, .. } => {
            cmd.arg(format!(
                "s3://cdc-lake/{prefix}/cdc_events/table=public.orders"
            ));
            cmd.args(["--s3-endpoint", &s3_endpoint()]);
        }
    }
    cmd.args(extra);
    let out = output_within(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "delta_read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The coordinates of a read, sorted; each must be there once.
fn coords_of(v: &Value) -> Vec<(String, i32, i64)> {
    let all = lake_coords(v);
    assert_eq!(
        all.len(),
        v["coords"].as_array().unwrap().len(),
        "an offset read twice"
    );
    all.into_iter().collect()
}

fn expected(records: &[Fixture]) -> Vec<(String, i32, i64)> {
    let mut all: Vec<_> = records
        .iter()
        .map(|r| (r.topic.clone(), r.partition, r.offset))
        .collect();
    all.sort();
    all
}

/// Orders of a second run: the first run's updates again, with a column `note` the first run's
/// rows do not have (Debezium sends the added column in `after` from the ALTER on).
fn with_added_column(records: &[Fixture], offset_base: &[i64; 4]) -> Vec<Fixture> {
    records
        .iter()
        .filter(|r| {
            r.value
                .as_deref()
                .is_some_and(|v| v.contains(r#""op":"u""#))
        })
        .map(|r| {
            let mut r = r.clone();
            let value = r.value.take().unwrap();
            r.value = Some(value.replace(
                r#""status":"SHIPPED","#,
                r#""status":"DELIVERED","note":"left at the door","#,
            ));
            r
        })
        .scan([0i64; 4], |next, mut r| {
            let p = r.partition as usize;
            r.offset = offset_base[p] + next[p];
            next[p] += 1;
            Some(r)
        })
        .collect()
}

/// Runs a pod until the raw log holds `total` records, then stops it (which drains the lake).
async fn run_until_stored(
    cfg: &cdc_lake::config::Config,
    client: &tokio_postgres::Client,
    total: usize,
) {
    let pod = Pod::start(cfg.clone());
    wait_until(
        &format!("{total} records in the raw log"),
        Duration::from_secs(90),
        || async { count(client, "SELECT count(*) FROM cdc_raw.cdc_events").await >= total as i64 },
    )
    .await;
    pod.stop().await;
}

async fn run(lake: LakeTarget) {
    let prefix = unique("dlt").replace('_', "-");
    let (first, _) = order_stream(&prefix, 300);
    produce(&first).await;
    let db = fresh_db("delta").await;
    let extra = [
        ("CDC_LAKE__BATCH__MAX_RECORDS", "100"),
        ("CDC_LAKE__LAKE__ROLL_ROWS", "120"),
        ("CDC_LAKE__LAKE__TABLE_FORMAT", "delta"),
        // Checkpoints and log cleanup run inside the test.
        ("CDC_LAKE__LAKE__DELTA__CHECKPOINT_INTERVAL", "5"),
    ];
    let cfg = config(&db, &prefix, &lake, &extra);
    let client = pg(&db).await;

    // A stop drains every buffer: the manifest and the Delta log hold the whole first run.
    run_until_stored(&cfg, &client, first.len()).await;
    let v1 = delta_read(&lake, &[]);
    assert_eq!(
        coords_of(&v1),
        expected(&first),
        "each offset once after the first run"
    );
    assert!(
        !v1["after_columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "note"),
        "no note column yet: {}",
        v1["after_columns"]
    );
    let version1 = v1["version"].as_i64().unwrap();

    let mut next = [0i64; 4];
    for r in &first {
        next[r.partition as usize] = next[r.partition as usize].max(r.offset + 1);
    }
    let second = with_added_column(&first, &next);
    let produced: Vec<_> = produce(&second).await;
    let mut produced_sorted = produced.clone();
    produced_sorted.sort();
    assert_eq!(
        produced_sorted,
        expected(&second),
        "the second run's offsets"
    );
    run_until_stored(&cfg, &client, first.len() + second.len()).await;

    let all: Vec<Fixture> = first.iter().chain(&second).cloned().collect();
    let apps: Vec<String> = (0..4)
        .flat_map(|p| {
            [
                "--app".to_string(),
                format!("cdc-lake/{prefix}.public.orders/{p}"),
            ]
        })
        .collect();
    let apps: Vec<&str> = apps.iter().map(String::as_str).collect();
    let latest = delta_read(&lake, &apps);
    assert_eq!(
        coords_of(&latest),
        expected(&all),
        "each offset once in the snapshot"
    );
    assert!(latest["version"].as_i64().unwrap() > version1);
    // Each partition's txn version is its next offset: what a republish checks.
    for p in 0..4 {
        assert_eq!(
            latest["txn"][format!("cdc-lake/{prefix}.public.orders/{p}")],
            Value::from(next[p] + second.iter().filter(|r| r.partition == p as i32).count() as i64),
            "txn version of partition {p}"
        );
    }
    // The added column: in the schema now, null for the first run's rows, the value after.
    assert!(latest["after_columns"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "note"));
    let notes = latest["notes"].as_object().unwrap();
    for r in &first {
        assert_eq!(notes[&format!("{}@{}", r.offset, r.partition)], Value::Null);
    }
    for r in &second {
        assert_eq!(
            notes[&format!("{}@{}", r.offset, r.partition)],
            "left at the door"
        );
    }

    // Time travel: the version after the first run shows exactly its offsets and its schema.
    let back = delta_read(&lake, &["--version", &version1.to_string()]);
    assert_eq!(
        coords_of(&back),
        expected(&first),
        "time travel to version {version1}"
    );
    assert!(!back["after_columns"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "note"));

    // A third run sends `total` as text (a type change in schemaless JSON): its files keep it
    // as `total__string`, so every file still fits the table and the whole table reads.
    let mut next2 = next;
    for r in &second {
        next2[r.partition as usize] = next2[r.partition as usize].max(r.offset + 1);
    }
    let third: Vec<Fixture> = with_added_column(&first, &next2)
        .into_iter()
        .map(|mut r| {
            let value = r.value.take().unwrap();
            r.value = Some(value.replace(r#""total":12.5"#, r#""total":"12.50 EUR""#));
            r
        })
        .collect();
    produce(&third).await;
    run_until_stored(&cfg, &client, first.len() + second.len() + third.len()).await;
    let all: Vec<Fixture> = all.into_iter().chain(third.iter().cloned()).collect();
    let latest = delta_read(&lake, &[]);
    assert_eq!(
        coords_of(&latest),
        expected(&all),
        "each offset once after the type change"
    );
    let after_columns = latest["after_columns"].as_array().unwrap();
    assert!(
        after_columns.iter().any(|c| c == "total")
            && after_columns.iter().any(|c| c == "total__string"),
        "{after_columns:?}"
    );
    let notes = latest["notes"].as_object().unwrap();
    assert_eq!(notes.len(), all.len(), "every row's after image read");

    // The pyarrow reader of the files agrees, and no Delta entry names a missing or unlisted
    // file (LakeTarget::check asserts those); every manifest file is in the snapshot.
    let report = lake.check();
    let delta = &report["delta"];
    assert_eq!(
        delta["unpublished"],
        serde_json::json!([]),
        "manifest files missing from Delta"
    );
    assert_eq!(delta["duplicates"], 0);
    let files: BTreeSet<_> = lake_coords(&report).into_iter().collect();
    assert_eq!(files.len(), all.len());
}

#[test]
fn delta_tables_on_a_local_lake_time_travel_and_evolve() {
    run_test(run(LakeTarget::local("delta-local")));
}

#[test]
fn delta_tables_on_s3_time_travel_and_evolve() {
    run_test(run(LakeTarget::s3("delta-s3")));
}
