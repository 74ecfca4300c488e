//! Bad input never stops the pod: every record lands in the raw log, in cdc_rejects with its
//! reason, or in a counted skip, and healthy records after it keep flowing.

mod common;

use std::time::Duration;

use common::*;

fn order(prefix: &str, id: &str, op: &str, lsn: i64) -> String {
    let after = if op == "d" {
        "null".to_string()
    } else {
        format!(r#"{{"id":"{id}","user_id":"u","total":1.5,"status":"CONFIRMED","created_at":1}}"#)
    };
    let before = if op == "d" {
        format!(r#"{{"id":"{id}"}}"#)
    } else {
        "null".into()
    };
    format!(
        r#"{{"before":{before},"after":{after},"source":{{"name":"{prefix}","ts_ms":1795239028962,"snapshot":"false","db":"ecomdb","sequence":"[\"{lsn}\",\"{lsn}\"]","schema":"public","table":"orders","txId":1,"lsn":{lsn}}},"op":"{op}","ts_ms":1795239029422}}"#
    )
}

#[test]
fn bad_records_are_rejected_or_skipped_and_the_stream_continues() {
    run_test(async {
        let prefix = unique("bad").replace('_', "-");
        let topic = format!("{prefix}.public.orders");
        let rec = |key: Option<&str>, value: Option<String>| Fixture {
            topic: topic.clone(),
            partition: 0,
            offset: 0,
            key: key.map(str::to_string),
            value,
        };
        let k1 = r#"{"id":"a1"}"#;
        let k2 = r#"{"id":"a2"}"#;
        let records = vec![
            rec(Some(k1), Some(order(&prefix, "a1", "c", 100))),
            rec(Some(k1), Some("{\"before\": nul".into())),
            rec(Some(k1), Some(r#"{"hello":"world"}"#.into())),
            rec(Some(k1), Some(order(&prefix, "a1", "x", 150))),
            rec(Some(k1), Some(order(&prefix, "a1", "d", 200))),
            // Debezium's tombstone after the delete: a null value.
            rec(Some(k1), None),
            rec(Some(k2), Some(order(&prefix, "a2", "c", 300))),
        ];
        let delivered = produce(&records).await;
        let offsets: Vec<i64> = delivered.iter().map(|d| d.2).collect();
        assert_eq!(offsets, (0..7).collect::<Vec<i64>>());

        let db = fresh_db("badinput").await;
        let lake = LakeTarget::local("bad-input");
        let pod = Pod::start(config(&db, &prefix, &lake, &[]));
        let client = pg(&db).await;
        // The healthy record after the poison ones arrives: the partition did not stop.
        wait_until(
            "the record after the bad ones in the mirror",
            Duration::from_secs(60),
            || async {
                count(
                    &client,
                    "SELECT count(*) FROM cdc_processed.orders WHERE id = 'a2'",
                )
                .await
                    == 1
            },
        )
        .await;
        let metrics = cdc_lake::telemetry::render();
        pod.stop().await;

        let raw: Vec<i64> = client
            .query(
                "SELECT kafka_offset FROM cdc_raw.cdc_events ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(raw, vec![0, 4, 6], "valid envelopes in the raw log");

        let rejects: Vec<(i64, String, Vec<u8>)> = client
            .query(
                "SELECT kafka_offset, reason, raw_value FROM cdc_raw.cdc_rejects ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(rejects.len(), 3, "{rejects:?}");
        assert_eq!(rejects[0].0, 1);
        assert!(rejects[0].1.contains("not valid JSON"), "{}", rejects[0].1);
        assert_eq!(rejects[0].2, b"{\"before\": nul", "raw bytes kept exactly");
        assert_eq!(rejects[1].0, 2);
        assert!(
            rejects[1].1.contains("not a Debezium envelope"),
            "{}",
            rejects[1].1
        );
        assert_eq!(rejects[2].0, 3);
        assert!(
            rejects[2].1.contains("unknown op \"x\""),
            "{}",
            rejects[2].1
        );

        // The tombstone (offset 5) is in neither table: it is a counted skip, and the checkpoint
        // moved past every offset.
        let next: i64 = client
            .query_one(
                "SELECT next_offset FROM cdc_lake.checkpoints WHERE sink = 'raw' AND kafka_topic = $1",
                &[&topic],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(next, 7);
        let tombstones = metrics
            .lines()
            .find(|l| {
                l.starts_with("cdc_lake_records_skipped_total")
                    && l.contains("sink=\"decode\"")
                    && l.contains("tombstone")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok());
        assert_eq!(
            tombstones,
            Some(1),
            "tombstone counted as a skip:\n{metrics}"
        );
        for kind in ["invalid_json", "not_an_envelope", "unknown_op"] {
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with("cdc_lake_records_rejected_total") && l.contains(kind)),
                "reject metric for {kind}:\n{metrics}"
            );
        }

        // State: a1 was created then deleted (the tombstone is not a second delete), a2 exists.
        let ids: Vec<String> = client
            .query("SELECT id FROM cdc_processed.orders ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(ids, vec!["a2".to_string()]);
    });
}

/// Data the mirror cannot take never stalls the pipeline: a declared `Date` far out of range
/// (found by tools/fuzz) and a table with a column named like cdc-lake's metadata are rejected
/// at the state stage with reasons naming the table (and column); the raw log keeps them and
/// the next healthy change is applied.
#[test]
fn values_and_tables_the_mirror_cannot_take_are_rejected_not_retried() {
    run_test(async {
        let prefix = unique("badval").replace('_', "-");
        let envelope = |table: &str, fields: &str, after: &str, lsn: i64| {
            format!(
                r#"{{"schema":{{"type":"struct","fields":[{{"type":"struct","optional":true,"field":"before","fields":[{fields}]}},{{"type":"struct","optional":true,"field":"after","fields":[{fields}]}}]}},"payload":{{"before":null,"after":{after},"source":{{"name":"{prefix}","ts_ms":1795239028962,"snapshot":"false","db":"ecomdb","sequence":"[\"{lsn}\",\"{lsn}\"]","schema":"public","table":"{table}","txId":1,"lsn":{lsn}}},"op":"c","ts_ms":1795239029422}}}}"#
            )
        };
        let dated = r#"{"type":"int32","optional":false,"field":"id"},{"type":"int32","optional":true,"name":"io.debezium.time.Date","version":1,"field":"day"}"#;
        let clash = r#"{"type":"int32","optional":false,"field":"id"},{"type":"string","optional":true,"field":"cdc_operation"}"#;
        let rec = |table: &str, key: &str, value: String| Fixture {
            topic: format!("{prefix}.public.{table}"),
            partition: 0,
            offset: 0,
            key: Some(key.into()),
            value: Some(value),
        };
        let records = vec![
            rec(
                "events",
                r#"{"id":1}"#,
                envelope("events", dated, r#"{"id":1,"day":19000}"#, 100),
            ),
            rec(
                "events",
                r#"{"id":2}"#,
                envelope(
                    "events",
                    dated,
                    &format!(r#"{{"id":2,"day":{}}}"#, i64::MAX),
                    200,
                ),
            ),
            rec(
                "events",
                r#"{"id":3}"#,
                envelope("events", dated, r#"{"id":3,"day":19001}"#, 300),
            ),
            rec(
                "clash",
                r#"{"id":1}"#,
                envelope("clash", clash, r#"{"id":1,"cdc_operation":"x"}"#, 400),
            ),
        ];
        produce(&records).await;
        let db = fresh_db("badvalue").await;
        let lake = LakeTarget::local("bad-value");
        let pod = Pod::start(config(&db, &prefix, &lake, &[]));
        let client = pg(&db).await;
        wait_until(
            "the healthy rows and two rejects",
            Duration::from_secs(60),
            || async {
                count(&client, "SELECT count(*) FROM cdc_processed.events").await == 2
                    && count(&client, "SELECT count(*) FROM cdc_raw.cdc_rejects").await == 2
            },
        )
        .await;
        pod.stop().await;
        let day: String = client
            .query_one(
                "SELECT day::text FROM cdc_processed.events WHERE id = 3",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(day, "2022-01-09");
        let reasons: Vec<(i64, String, String)> = client
            .query(
                "SELECT kafka_offset, stage, reason FROM cdc_raw.cdc_rejects ORDER BY kafka_topic DESC",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        let (_, stage, reason) = &reasons[0];
        assert_eq!(stage, "state");
        assert!(
            reason.contains("public.events") && reason.contains("column day"),
            "{reason}"
        );
        let (_, stage, reason) = &reasons[1];
        assert_eq!(stage, "state");
        assert!(
            reason.contains("public.clash") && reason.contains("cdc_operation"),
            "{reason}"
        );
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await,
            4,
            "the raw log keeps every change"
        );
    });
}

/// A table without a primary key: without configured key columns its changes are rejected
/// with a reason that says how to mirror it (the raw log keeps them); with
/// `state.key_columns` the mirror is keyed by those columns.
#[test]
fn keyless_tables_are_rejected_with_advice_or_mirrored_by_configured_keys() {
    run_test(async {
        let prefix = unique("keyless").replace('_', "-");
        let change = |op: &str, id: i32, note: &str, lsn: i64| Fixture {
            topic: format!("{prefix}.public.audit_log"),
            partition: 0,
            offset: 0,
            key: None,
            value: Some(format!(
                r#"{{"before":null,"after":{{"id":{id},"note":"{note}"}},"source":{{"name":"{prefix}","ts_ms":1795239028962,"snapshot":"false","db":"ecomdb","sequence":"[\"{lsn}\",\"{lsn}\"]","schema":"public","table":"audit_log","txId":1,"lsn":{lsn}}},"op":"{op}","ts_ms":1795239029422}}"#
            )),
        };
        let records = vec![
            change("c", 1, "first", 100),
            change("c", 2, "second", 200),
            change("u", 1, "first, edited", 300),
        ];
        produce(&records).await;

        // Without configuration: rejected with advice, kept in the raw log.
        let db = fresh_db("keyless").await;
        let lake = LakeTarget::local("keyless");
        let pod = Pod::start(config(&db, &prefix, &lake, &[]));
        let client = pg(&db).await;
        wait_until("three rejects", Duration::from_secs(60), || async {
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_rejects").await == 3
        })
        .await;
        pod.stop().await;
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await,
            3
        );
        let reason: String = client
            .query_one("SELECT DISTINCT reason FROM cdc_raw.cdc_rejects", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            reason.contains("public.audit_log has no primary key")
                && reason.contains(r#"state.key_columns."public.audit_log""#),
            "{reason}"
        );

        // With key columns configured: mirrored, the update applied to its row.
        let db = fresh_db("keyed").await;
        let lake = LakeTarget::local("keyed");
        let mut cfg = config(&db, &prefix, &lake, &[]);
        cfg.state
            .key_columns
            .insert("public.audit_log".into(), vec!["id".into()]);
        let pod = Pod::start(cfg);
        let client = pg(&db).await;
        wait_until("the keyed mirror", Duration::from_secs(60), || async {
            count(
                &client,
                "SELECT count(*) FROM cdc_processed.audit_log WHERE note = 'first, edited'",
            )
            .await
                == 1
        })
        .await;
        pod.stop().await;
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_processed.audit_log").await,
            2
        );
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_rejects").await,
            0
        );
    });
}
