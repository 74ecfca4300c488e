//! `cdc-lake rejects`: counts per reason, listing, and reprocessing once the cause is fixed, on
//! real services. A value the mirror column cannot hold is rejected (stage state) with the table
//! named; after the column is widened, reprocessing applies it. A malformed record stays
//! rejected, with its reason.

mod common;

use std::time::Duration;

use cdc_lake::rejects::{self, RejectFilter};
use common::*;

fn order(prefix: &str, offset: i64, op: &str, id: &str, total: &str, lsn: i64) -> Fixture {
    let value = format!(
        r#"{{"before":null,"after":{{"id":"{id}","status":"NEW","total":{total}}},"source":{{"version":"3.6.3.Final","connector":"postgresql","name":"{prefix}","ts_ms":1795239028962,"snapshot":"false","db":"ecomdb","sequence":"[\"{lsn}\",\"{lsn}\"]","schema":"public","table":"orders","txId":766,"lsn":{lsn},"xmin":null}},"transaction":null,"op":"{op}","ts_ms":1795239029422}}"#
    );
    Fixture {
        topic: format!("{prefix}.public.orders"),
        partition: 0,
        offset,
        key: Some(format!(r#"{{"id":"{id}"}}"#)),
        value: Some(value),
    }
}

#[test]
fn rejects_are_counted_listed_and_reprocessed_once_fixed() {
    run_test(async {
        let prefix = unique("rej").replace('_', "-");
        let mut records = vec![
            order(&prefix, 0, "c", "a1", "12.5", 100),
            // A number column now receives text: the mirror cannot hold it.
            order(&prefix, 1, "u", "a1", "\"twelve\"", 200),
            order(&prefix, 2, "c", "b2", "3.0", 300),
        ];
        records.push(Fixture {
            topic: records[0].topic.clone(),
            partition: 0,
            offset: 3,
            key: Some(r#"{"id":"c3"}"#.into()),
            value: Some("{this is not json".into()),
        });
        produce(&records).await;
        let db = fresh_db("rejects").await;
        let lake = LakeTarget::local("rejects");
        let cfg = config(&db, &prefix, &lake, &[]);
        let pod = Pod::start(cfg.clone());
        let client = pg(&db).await;
        wait_until(
            "three changes and two rejects",
            Duration::from_secs(60),
            || async {
                count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await == 3
                    && count(&client, "SELECT count(*) FROM cdc_raw.cdc_rejects").await == 2
            },
        )
        .await;
        pod.stop().await;

        // The status views: events per table and operation, and no sink behind the raw log.
        let stats: Vec<(String, i64)> = pairs(
            &client,
            "SELECT operation, events FROM cdc_raw.cdc_statistics
                  WHERE source_table = 'public.orders' ORDER BY 1",
            &[],
        )
        .await;
        assert_eq!(stats, vec![("c".to_string(), 2), ("u".to_string(), 1)]);
        assert_eq!(
            count(
                &client,
                "SELECT count(*) FROM cdc_raw.cdc_sync_summary WHERE sink = 'state' AND behind_raw = 0"
            )
            .await,
            1
        );

        let all = RejectFilter::default();
        let counts = rejects::counts(&cfg, &all).await.unwrap();
        assert_eq!(counts.len(), 2, "{counts:?}");
        let state = counts.iter().find(|(s, ..)| s == "state").unwrap();
        assert!(
            state.1.contains("cdc_processed.orders column total")
                && state.1.contains("double precision"),
            "the reason names the table, the column and the type: {state:?}"
        );
        let decode = counts.iter().find(|(s, ..)| s == "decode").unwrap();
        assert!(decode.1.contains("not valid JSON"), "{decode:?}");

        // Nothing fixed yet: reprocessing leaves both where they are.
        let report = rejects::reprocess(&cfg, &all, false).await.unwrap();
        assert_eq!((report.recovered_decode, report.recovered_state), (0, 0));
        assert_eq!(report.still_rejected.values().sum::<u64>(), 2, "{report:?}");

        // The operator widens the column, then reprocesses the state rejects.
        client
            .batch_execute("ALTER TABLE cdc_processed.orders ALTER COLUMN total TYPE text")
            .await
            .unwrap();
        let state_only = RejectFilter {
            stage: Some("state".into()),
            ..RejectFilter::default()
        };
        let dry = rejects::reprocess(&cfg, &state_only, true).await.unwrap();
        assert_eq!(dry.recovered_state, 1);
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_rejects").await,
            2,
            "a dry run writes nothing"
        );
        let report = rejects::reprocess(&cfg, &state_only, false).await.unwrap();
        assert_eq!(report.recovered_state, 1, "{report:?}");
        let total: String = client
            .query_one(
                "SELECT total FROM cdc_processed.orders WHERE id = 'a1'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(total, "twelve");
        let left = rejects::list(&cfg, &all, 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(
            (left[0].stage.as_str(), left[0].coords.offset),
            ("decode", 3)
        );
        assert_eq!(left[0].value.as_deref(), Some(&b"{this is not json"[..]));

        let bad = RejectFilter {
            stage: Some("later".into()),
            ..RejectFilter::default()
        };
        assert!(rejects::counts(&cfg, &bad).await.is_err());
    });
}

/// Waits until the mirror's checkpoint (partition 0, where the fixtures go) reaches `next`.
async fn state_reaches(client: &tokio_postgres::Client, next: i64, what: &str) {
    let sql = format!(
        "SELECT count(*) FROM cdc_lake.checkpoints WHERE sink = 'state' AND next_offset = {next}"
    );
    wait_until(what, Duration::from_secs(60), || async {
        count(client, &sql).await == 1
    })
    .await;
}

/// The operator's fix for a `state` reject, an `ALTER ... TYPE` on the mirror, made while the
/// pod runs: the pod staged in the column's old type, and must notice the table changed rather
/// than go on rejecting what the new type holds.
#[test]
fn a_column_type_changed_while_the_pod_runs_takes_the_next_changes() {
    run_test(async {
        let prefix = unique("rej-alter").replace('_', "-");
        produce(&[order(&prefix, 0, "c", "a1", "12.5", 100)]).await;
        let db = fresh_db("rejects_alter").await;
        let lake = LakeTarget::local("rejects_alter");
        let pod = Pod::start(config(&db, &prefix, &lake, &[]));
        let client = pg(&db).await;
        state_reaches(&client, 1, "the first change mirrored").await;
        client
            .batch_execute("ALTER TABLE cdc_processed.orders ALTER COLUMN total TYPE text")
            .await
            .unwrap();
        produce(&[
            order(&prefix, 1, "u", "a1", "\"twelve\"", 200),
            order(&prefix, 2, "c", "b2", "\"three\"", 300),
        ])
        .await;
        state_reaches(&client, 3, "both changes mirrored").await;
        pod.stop().await;
        let rows: Vec<(String, String)> = pairs(
            &client,
            "SELECT id, total FROM cdc_processed.orders ORDER BY id",
            &[],
        )
        .await;
        assert_eq!(
            rows,
            vec![
                ("a1".to_string(), "twelve".to_string()),
                ("b2".to_string(), "three".to_string())
            ]
        );
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_rejects").await,
            0,
            "nothing is rejected once the column holds text"
        );
    });
}
