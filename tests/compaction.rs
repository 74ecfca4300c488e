//! `cdc-lake lake compact` on a lake of small files (one per record), killed at each of its
//! steps, read by independent readers: the `deltalake` Python package through the Delta log,
//! pyarrow over the files and the manifest (tests/lake_check.py), and `cdc-replay --source lake`
//! into the mirror, compared with a fold of the records produced. Local lake and S3 (moto).
//! Then the pod's own compaction policy (`[lake.compaction] every`), beside ingest.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cdc_lake::replay::{self, SourceKind};
use cdc_lake::telemetry::METRICS;
use common::*;
use serde_json::Value;

/// `tests/delta_read.py --rows yes` on the table of `public.orders`: every row and the schema.
fn delta_rows(lake: &LakeTarget) -> Value {
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
    cmd.args(["--rows", "yes"]);
    let out = output_within(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "delta_read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `cdc-lake lake compact` on the lake, crashing at `crash_at` when given.
fn compact(lake: &LakeTarget, args: &[&str], crash_at: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdc-lake"));
    cmd.args(["lake", "compact", "--before", "2100-01-01"])
        .args(args)
        .env("CDC_LAKE__LAKE__TABLE_FORMAT", "delta")
        .envs(lake.env());
    if let Some(point) = crash_at {
        cmd.env("CDC_LAKE_CRASH_AT", point);
    }
    let out = output_within(cmd, Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&out.stderr);
    match crash_at {
        Some(point) => assert!(
            !out.status.success() && stderr.contains(&format!("crashing at {point}")),
            "the compaction was to crash at {point}: {:?} {stderr}",
            out.status
        ),
        None => assert!(out.status.success(), "compaction failed: {stderr}"),
    }
    out
}

/// What the lake holds, read three ways, each of which must hold every offset exactly once.
struct Reading {
    /// Through Delta: every row (as text) per offset, and the table's schema.
    delta_rows: Value,
    delta_schema: Value,
    /// The manifest's current files (pyarrow), and files still waiting for their retention.
    files: u64,
    retired: usize,
    orphans: usize,
    delta_files: u64,
}

fn read(lake: &LakeTarget, expected: &BTreeSet<(String, i32, i64)>) -> Reading {
    // check() also asserts that no Delta entry names an absent or unknown file.
    let report = lake.check();
    assert_eq!(
        &lake_coords(&report),
        expected,
        "current files hold every offset"
    );
    // An upload no record names yet (a compaction killed before its record) is seen by a
    // glob, and only then.
    let orphans = report["unlisted"].as_array().unwrap().len();
    if orphans == 0 {
        assert_eq!(report["duplicates"], 0, "an offset in two current files");
        assert_eq!(
            report["coords"].as_array().unwrap().len(),
            expected.len(),
            "each offset once in the current files"
        );
    }
    let delta = &report["delta"];
    assert_eq!(
        &lake_coords(delta),
        expected,
        "the Delta snapshot holds every offset"
    );
    assert_eq!(delta["coords"].as_array().unwrap().len(), expected.len());
    let rows = delta_rows(lake);
    Reading {
        delta_rows: rows["rows"].clone(),
        delta_schema: rows["schema"].clone(),
        files: report["current_files"].as_u64().unwrap(),
        retired: report["retired"].as_array().unwrap().len(),
        orphans,
        delta_files: delta["files"].as_u64().unwrap(),
    }
}

/// The mirror rebuilt from the lake: id -> status.
async fn replayed(
    cfg: &cdc_lake::config::Config,
    client: &tokio_postgres::Client,
) -> BTreeMap<String, String> {
    replay::run(cfg, &rebuild_args("processed", SourceKind::Lake))
        .await
        .unwrap();
    pairs(
        client,
        "SELECT id::text, status FROM cdc_processed.orders",
        &[],
    )
    .await
}

async fn run(lake: LakeTarget, orders: usize) {
    let prefix = unique("cmp").replace('_', "-");
    let (records, fold) = order_stream(&prefix, orders);
    produce(&records).await;
    let db = fresh_db("compaction").await;
    // One record per batch and a roll at every row: one lake file per record.
    let extra = [
        ("CDC_LAKE__BATCH__MAX_RECORDS", "1"),
        ("CDC_LAKE__LAKE__ROLL_ROWS", "1"),
        ("CDC_LAKE__LAKE__TABLE_FORMAT", "delta"),
    ];
    let cfg = config(&db, &prefix, &lake, &extra);
    let client = pg(&db).await;
    let pod = Pod::start(cfg.clone());
    wait_raw_rows(
        &client,
        records.len() as i64,
        "every record in the raw log",
        Duration::from_secs(240),
    )
    .await;
    pod.stop().await;
    let expected: BTreeSet<(String, i32, i64)> = records
        .iter()
        .map(|r| (r.topic.clone(), r.partition, r.offset))
        .collect();

    let before = read(&lake, &expected);
    assert_eq!(before.files, records.len() as u64, "one file per record");
    assert_eq!(before.delta_files, records.len() as u64);
    assert_eq!(
        replayed(&cfg, &client).await,
        fold,
        "replay from the lake before"
    );

    // Killed after uploading a compacted file, before its record: nothing changes for any
    // reader (the upload is an object no commit wrote, which the next run deletes).
    // Partitions are compacted in order; each kill below hits the first one, partition 0.
    let first_partition = records.iter().filter(|r| r.partition == 0).count() as u64;
    compact(&lake, &[], Some("compact:uploaded"));
    let after_upload = read(&lake, &expected);
    assert_eq!(
        after_upload.orphans, 1,
        "the compacted file, which no record names"
    );
    assert_eq!(
        after_upload.files, before.files,
        "an upload no record names is not a current file"
    );
    assert_eq!(after_upload.delta_rows, before.delta_rows);

    // Killed after the record, before the Delta commit: the manifest has the compacted file,
    // Delta still the small ones; both hold each offset once. The dead run's upload is gone.
    compact(&lake, &[], Some("compact:recorded"));
    let recorded = read(&lake, &expected);
    assert_eq!(recorded.orphans, 0, "the first kill's upload was deleted");
    assert_eq!(
        recorded.files,
        before.files - first_partition + 1,
        "partition 0 compacted in the manifest"
    );
    assert_eq!(
        recorded.delta_files, before.delta_files,
        "Delta not committed yet"
    );
    assert_eq!(recorded.delta_rows, before.delta_rows);

    // The next run lands the Delta commit the dead one left, and has nothing else to merge.
    let out = compact(&lake, &[], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 Delta commits finished"), "{stdout}");
    let compacted = read(&lake, &expected);
    assert_eq!((compacted.files, compacted.delta_files), (4, 4), "{stdout}");
    assert_eq!(
        compacted.retired,
        records.len(),
        "replaced files wait for the retention"
    );
    assert_eq!(
        compacted.delta_rows, before.delta_rows,
        "Delta rows identical"
    );
    assert_eq!(
        compacted.delta_schema, before.delta_schema,
        "Delta schema identical"
    );
    assert_eq!(
        replayed(&cfg, &client).await,
        fold,
        "replay from the lake after"
    );

    // Killed while vacuuming (retention 0): some replaced files are gone, no reader noticed.
    compact(&lake, &["--retention", "0s"], Some("compact:vacuum"));
    let vacuuming = read(&lake, &expected);
    assert!(vacuuming.retired < records.len() && vacuuming.retired > 0);
    assert_eq!(vacuuming.delta_rows, before.delta_rows);
    compact(&lake, &["--retention", "0s"], None);
    let vacuumed = read(&lake, &expected);
    assert_eq!(vacuumed.retired, 0, "every replaced file deleted");
    assert_eq!(vacuumed.delta_rows, before.delta_rows);
    assert_eq!(
        replayed(&cfg, &client).await,
        fold,
        "replay after the vacuum"
    );

    // The manifest still proves every raw row is in the lake: prune-raw deletes them all, and
    // the lake alone rebuilds the mirror.
    let prune = Command::new(env!("CARGO_BIN_EXE_cdc-lake"))
        .args(["prune-raw", "--before", "2100-01-01"])
        .env("CDC_LAKE__POSTGRES__URL", &db)
        .envs(lake.env())
        .output()
        .unwrap();
    assert!(
        prune.status.success(),
        "{}",
        String::from_utf8_lossy(&prune.stderr)
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await,
        0
    );
    assert_eq!(
        replayed(&cfg, &client).await,
        fold,
        "replay after prune-raw"
    );
}

#[test]
fn compaction_of_a_thousand_small_files_on_a_local_lake_survives_kills() {
    run_test(run(LakeTarget::local("compact-local"), 500));
}

#[test]
fn compaction_on_s3_survives_kills() {
    run_test(run(LakeTarget::s3("compact-s3"), 60));
}

/// In-pod compaction runs that ended with `outcome`. Only this test's pod compacts in this
/// process (the tests above run `lake compact` as a child process).
fn pod_compactions(outcome: &str) -> u64 {
    METRICS.compaction_runs.with_label_values(&[outcome]).get()
}

/// The pod compacts its own lake while it writes one file per record: runs beside ingest merge
/// the files (dated by the envelopes' source time, days ago), and once everything is committed and two more runs ended (one to
/// merge what is left, one to vacuum what it replaced), each partition is one file, no replaced
/// file is left, and every reader sees each offset once.
async fn pod_compacts_its_lake(lake: LakeTarget) {
    let prefix = unique("podcmp").replace('_', "-");
    let (records, fold) = order_stream(&prefix, 150);
    produce(&records).await;
    let db = fresh_db("pod_compaction").await;
    let extra = [
        ("CDC_LAKE__BATCH__MAX_RECORDS", "1"),
        ("CDC_LAKE__LAKE__ROLL_ROWS", "1"),
        ("CDC_LAKE__LAKE__TABLE_FORMAT", "delta"),
        ("CDC_LAKE__LAKE__COMPACTION__EVERY", "1s"),
        ("CDC_LAKE__LAKE__COMPACTION__RETENTION", "0s"),
    ];
    let cfg = config(&db, &prefix, &lake, &extra);
    let client = pg(&db).await;
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for r in &records {
        *ends.entry(r.partition).or_default() += 1;
    }
    let topic = records[0].topic.clone();
    let pod = Pod::start(cfg.clone());
    // The pod's own signal that every sink holds every record: its committed offsets.
    wait_until(
        "the pod to commit every partition's end",
        Duration::from_secs(240),
        || async {
            ends.iter().all(|(p, end)| {
                METRICS
                    .committed
                    .with_label_values(&[topic.as_str(), &p.to_string()])
                    .get()
                    == *end
            })
        },
    )
    .await;
    assert!(
        METRICS
            .compaction_files
            .with_label_values(&["replaced"])
            .get()
            > 0,
        "runs beside ingest merged files before it caught up"
    );
    // A run in flight may have started before the last commit: two whole runs after it.
    let ok_at_commit = pod_compactions("ok");
    wait_until(
        "three more in-pod compaction runs",
        Duration::from_secs(180),
        || async { pod_compactions("ok") >= ok_at_commit + 3 },
    )
    .await;
    pod.stop().await;
    assert_eq!(pod_compactions("failed"), 0, "no in-pod run failed");

    let expected: BTreeSet<(String, i32, i64)> = records
        .iter()
        .map(|r| (r.topic.clone(), r.partition, r.offset))
        .collect();
    let compacted = read(&lake, &expected);
    assert_eq!(compacted.orphans, 0, "no upload without its record");
    assert_eq!(
        (compacted.files, compacted.delta_files),
        (ends.len() as u64, ends.len() as u64),
        "one file per partition, in the manifest and in Delta"
    );
    assert_eq!(compacted.retired, 0, "every replaced file vacuumed");
    assert_eq!(
        replayed(&cfg, &client).await,
        fold,
        "replay from the compacted lake"
    );
}

#[test]
fn the_pod_compacts_its_own_lake_beside_ingest() {
    run_test(pod_compacts_its_lake(LakeTarget::local("compact-pod")));
}
