//! Stopping the pod mid-stream (gracefully, and by killing its task mid-write) and starting it
//! again leaves no gap and no duplicate in any sink.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;

async fn assert_exactly_once(
    db: &str,
    lake: &LakeTarget,
    records: &[Fixture],
    expected_state: &BTreeMap<String, String>,
) {
    let client = pg(db).await;
    let expected: BTreeSet<(String, i32, i64)> = records
        .iter()
        .map(|r| (r.topic.clone(), r.partition, r.offset))
        .collect();
    let raw = raw_coords(&client).await;
    assert!(raw.iter().all(|(.., n)| *n == 1), "duplicate raw rows");
    let raw_set: BTreeSet<_> = raw.into_iter().map(|(t, p, o, _)| (t, p, o)).collect();
    assert_eq!(raw_set.len(), expected.len(), "raw rows");
    assert_eq!(raw_set, expected, "raw log has a gap");

    let state: BTreeMap<String, String> = pairs(
        &client,
        "SELECT id::text, status FROM cdc_processed.orders",
        &[],
    )
    .await;
    assert_eq!(
        &state, expected_state,
        "mirror differs from the reference model"
    );

    let report = lake.check();
    assert_eq!(report["duplicates"], 0, "lake duplicates");
    assert_eq!(
        report["unlisted"].as_array().unwrap().len(),
        0,
        "objects outside the manifest: {}",
        report["unlisted"]
    );
    assert_eq!(report["zero_byte"], 0);
    let lake_set = lake_coords(&report);
    assert_eq!(lake_set, expected, "lake has a gap");
    // After the last (graceful) stop, the Delta log holds every manifest file.
    let delta = &report["delta"];
    assert_eq!(
        delta["unpublished"],
        serde_json::json!([]),
        "manifest files missing from Delta"
    );
    assert_eq!(lake_coords(delta), expected, "the Delta snapshot has a gap");
    assert_eq!(
        delta["rows"], report["rows"],
        "an offset twice in the Delta snapshot"
    );
}

async fn run_with_interruptions(lake: LakeTarget, kill: bool) {
    let prefix = unique("rst").replace('_', "-");
    let (records, expected_state) = order_stream(&prefix, 1500);
    produce(&records).await;
    let db = fresh_db("restart").await;
    // Small batches and files so the interruption lands mid-stream, between commits.
    let extra = [
        ("CDC_LAKE__BATCH__MAX_RECORDS", "100"),
        ("CDC_LAKE__LAKE__ROLL_ROWS", "150"),
        // A kill lands between a manifest commit and its Delta commit too: the restart
        // republishes what the log lacks.
        ("CDC_LAKE__LAKE__TABLE_FORMAT", "delta"),
    ];
    let cfg = config(&db, &prefix, &lake, &extra);
    let client = pg(&db).await;
    let total = records.len() as i64;

    let pod = Pod::start(cfg.clone());
    wait_until(
        "a first part in the raw log",
        Duration::from_secs(60),
        || async { count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await >= total / 4 },
    )
    .await;
    if kill {
        pod.kill().await;
    } else {
        pod.stop().await;
    }
    let part = count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await;
    assert!(
        part < total,
        "the interruption must land mid-stream ({part} of {total})"
    );

    // After a kill the replacement joins a fresh group (see after_kill); a stopped pod left
    // its group cleanly, so the same group works.
    let cfg = if kill { after_kill(&cfg) } else { cfg };
    let pod = Pod::start(cfg.clone());
    wait_until(
        "every record in the raw log",
        Duration::from_secs(90),
        || async { count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await >= total },
    )
    .await;
    // The mirror and the lake catch up within a roll interval; stop drains the rest.
    pod.stop().await;
    assert_exactly_once(&db, &lake, &records, &expected_state).await;
}

#[test]
fn graceful_stop_and_restart_local_lake() {
    run_test(async {
        run_with_interruptions(LakeTarget::local("restart-stop"), false).await;
    });
}

#[test]
fn killed_mid_write_and_restarted_s3_lake() {
    run_test(async {
        run_with_interruptions(LakeTarget::s3("restart-kill"), true).await;
    });
}
