//! Two real Debezium connectors on two source databases that both have `public.orders` (same
//! keys, different rows), through one pod (issue 14):
//! - with the default naming, one source owns the mirror and every change of the other is
//!   rejected with advice; nothing of the owner is overwritten;
//! - with a source-aware template and the lake's `source` layout, each source database gets a
//!   mirror and a lake directory of its own, each equal to its source table row for row.
//!
//! The oracle is the source databases themselves (mirrors, with column types) and an
//! independent fold of the lake's Parquet files (tests/lake_check.py).
//! Needs the dev stack with Debezium's jars (tools/up --debezium).
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio_postgres::Client;

/// A source database with `public.orders`: ids 1..=5, rows that differ per `tag`.
async fn source_db(db: &str, tag: &str) -> Client {
    let admin = pg(&format!("{}/postgres", source_base())).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let c = pg(&format!("{}/{db}", source_base())).await;
    c.batch_execute(&format!(
        "CREATE TABLE public.orders (id integer PRIMARY KEY, customer text NOT NULL,
                                     amount numeric(10,2) NOT NULL, placed_at timestamptz NOT NULL);
         INSERT INTO public.orders
         SELECT i, '{tag}-' || i, i * 10.5 + length('{tag}'), timestamptz '2026-01-01 00:00+00' + i * interval '1 hour'
           FROM generate_series(1, 5) i;"
    ))
    .await
    .unwrap();
    c
}

/// Streamed changes after the snapshot: an update, a delete and an insert of its own key.
async fn change(c: &Client, tag: &str, new_id: i32) {
    c.batch_execute(&format!(
        "UPDATE public.orders SET customer = '{tag}-updated', amount = amount + 1 WHERE id = 2;
         DELETE FROM public.orders WHERE id = 3;
         INSERT INTO public.orders VALUES ({new_id}, '{tag}-last', 99.99, timestamptz '2026-02-01 00:00+00');"
    ))
    .await
    .unwrap();
}

/// Waits until the pod's own signals say it has everything Debezium sent for `topic`: the
/// last streamed change (the insert of `last_id`) in the raw log, and the state checkpoint past
/// every raw offset of the topic.
async fn wait_ingested(sink: &Client, topic: &str, last_id: i32) {
    let last = format!(
        "SELECT count(*) FROM cdc_raw.cdc_events WHERE kafka_topic = '{topic}' AND operation = 'c' AND after_data->>'id' = '{last_id}'"
    );
    wait_until(
        &format!(
            "the last change of {topic} in the raw log (is Debezium running? tools/up --debezium)"
        ),
        Duration::from_secs(180),
        || async { count(sink, &last).await == 1 },
    )
    .await;
    let behind = format!(
        "SELECT count(*) FROM cdc_raw.cdc_events e
          WHERE e.kafka_topic = '{topic}'
            AND NOT EXISTS (SELECT 1 FROM cdc_lake.checkpoints c
                             WHERE c.sink = 'state' AND c.kafka_topic = e.kafka_topic
                               AND c.kafka_partition = e.kafka_partition AND c.next_offset > e.kafka_offset)"
    );
    wait_until(
        &format!("the state checkpoint of {topic}"),
        Duration::from_secs(60),
        || async { count(sink, &behind).await == 0 },
    )
    .await;
}

#[test]
fn two_connectors_with_one_table_name_never_mix() {
    run_test(async {
        let stem = unique("twosrc").replace('_', "");
        let (db_a, db_b) = (format!("{stem}_a"), format!("{stem}_b"));
        // Dotted prefixes: one subscription pattern (`^<stem>\.`) takes both connectors' topics,
        // and the server names exercise the template's escaping.
        let (server_a, server_b) = (format!("{stem}.a"), format!("{stem}.b"));
        let (topic_a, topic_b) = (
            format!("{server_a}.public.orders"),
            format!("{server_b}.public.orders"),
        );
        let src_a = source_db(&db_a, "alpha").await;
        let src_b = source_db(&db_b, "beta").await;
        let conn_a = Connector::start(&server_a, &db_a, "schema", &[]);
        let conn_b = Connector::start(&server_b, &db_b, "schema", &[]);

        // One pod, the default naming: the first source to reach `orders` owns it.
        let default_url = fresh_db("twosrc_default").await;
        let default_lake = LakeTarget::local("twosrc-default");
        let pod = Pod::start(config(&default_url, &stem, &default_lake, &[]));
        let sink = pg(&default_url).await;
        // Each source's snapshot, then its streamed changes.
        wait_until(
            "both snapshots in the raw log",
            Duration::from_secs(180),
            || async {
                count(
                    &sink,
                    &format!("SELECT count(*) FROM cdc_raw.cdc_events WHERE operation = 'r' AND kafka_topic IN ('{topic_a}', '{topic_b}')"),
                )
                .await
                    == 10
            },
        )
        .await;
        change(&src_a, "alpha", 6).await;
        change(&src_b, "beta", 7).await;
        wait_ingested(&sink, &topic_a, 6).await;
        wait_ingested(&sink, &topic_b, 7).await;
        pod.stop().await;

        let expected_a = order_rows(&src_a, "public.orders", &[]).await;
        let expected_b = order_rows(&src_b, "public.orders", &[]).await;
        assert_ne!(expected_a, expected_b, "the two sources differ");
        let mirror = order_rows(&sink, "cdc_processed.orders", &[]).await;
        let (owner_db, other_topic) = if mirror == expected_a {
            (&db_a, &topic_b)
        } else {
            assert_eq!(
                mirror, expected_b,
                "the default mirror holds exactly one source's rows, none overwritten by the other"
            );
            (&db_b, &topic_a)
        };
        let owner: String = sink
            .query_one(
                "SELECT source_db FROM cdc_lake.mirror_sources WHERE target_schema = 'cdc_processed' AND mirror_table = 'orders'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(&owner, owner_db, "the mirror records its source");
        // Every change of the other source is a state reject with advice; none is lost.
        let other_changes = count(
            &sink,
            &format!("SELECT count(*) FROM cdc_raw.cdc_events WHERE kafka_topic = '{other_topic}' AND operation IN ('r', 'c', 'u', 'd')"),
        )
        .await;
        assert_eq!(
            other_changes, 8,
            "5 snapshot reads, an update, a delete, an insert"
        );
        let advised = count(
            &sink,
            &format!(
                "SELECT count(*) FROM cdc_raw.cdc_rejects WHERE kafka_topic = '{other_topic}' AND stage = 'state'
                    AND reason LIKE '%belongs to public.orders of server%' AND reason LIKE '%state.table_name%{{db}}%'"
            ),
        )
        .await;
        assert_eq!(
            advised, other_changes,
            "each change of the other source is rejected with advice"
        );

        // The same topics through a source-aware pod: a mirror and a lake directory per source.
        let aware_url = fresh_db("twosrc_aware").await;
        let aware_lake = LakeTarget::local("twosrc-aware");
        let pod = Pod::start(config(
            &aware_url,
            &stem,
            &aware_lake,
            &[
                ("CDC_LAKE__STATE__TABLE_NAME", "{server}.{schema}.{table}"),
                ("CDC_LAKE__LAKE__LAYOUT", "source"),
            ],
        ));
        let sink = pg(&aware_url).await;
        wait_ingested(&sink, &topic_a, 6).await;
        wait_ingested(&sink, &topic_b, 7).await;
        pod.stop().await;
        drop(conn_a);
        drop(conn_b);

        for (server, db, expected) in [
            (&server_a, &db_a, &expected_a),
            (&server_b, &db_b, &expected_b),
        ] {
            // `{server}` escapes the dot in the server name: `<stem>\.a.public.orders`.
            let mirror_table = format!("{}.public.orders", server.replace('.', "\\."));
            let got = order_rows(
                &sink,
                &format!("cdc_processed.\"{}\"", mirror_table.replace('"', "\"\"")),
                &[],
            )
            .await;
            assert_eq!(
                &got, expected,
                "mirror {mirror_table} equals {db}.public.orders"
            );
            let types = column_types(&sink, "cdc_processed", &mirror_table, &ORDER_COLUMNS).await;
            let source_types = column_types(
                if db == &db_a { &src_a } else { &src_b },
                "public",
                "orders",
                &ORDER_COLUMNS,
            )
            .await;
            assert_eq!(source_types.len(), 4);
            assert_eq!(types, source_types, "column types of {mirror_table}");
        }
        let rejects = count(&sink, "SELECT count(*) FROM cdc_raw.cdc_rejects").await;
        assert_eq!(rejects, 0, "nothing rejected with a source-aware template");

        // The lake: one directory per source database, each folding to its source table's ids and
        // customers.
        let report = aware_lake.check();
        assert_eq!(report["duplicates"], 0);
        let state = report["state"].as_object().unwrap();
        for (server, db, expected) in [
            (&server_a, &db_a, &expected_a),
            (&server_b, &db_b, &expected_b),
        ] {
            let dir = format!("server={server}/db={db}/table=public.orders");
            let folded = state
                .get(&dir)
                .unwrap_or_else(|| panic!("lake directory {dir}; found {:?}", state.keys()));
            let got: BTreeMap<i64, String> = folded
                .as_object()
                .unwrap()
                .values()
                .map(|after| {
                    (
                        after["id"].as_i64().unwrap(),
                        after["customer"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            let want: BTreeMap<i64, String> = expected
                .iter()
                .map(|(id, row)| (*id, row["customer"].as_str().unwrap().to_string()))
                .collect();
            assert_eq!(got, want, "lake {dir} folds to {db}.public.orders");
        }
        drop_source_db(&db_a).await;
        drop_source_db(&db_b).await;
    });
}

/// A schemaless change envelope of `schema.table` with one row.
fn envelope(prefix: &str, schema: &str, table: &str, id: i64, lsn: i64) -> String {
    let who = serde_json::to_string(&format!("{schema}/{table}")).unwrap();
    let (schema, table) = (
        serde_json::to_string(schema).unwrap(),
        serde_json::to_string(table).unwrap(),
    );
    format!(
        r#"{{"before":null,"after":{{"id":{id},"who":{who}}},"source":{{"name":"{prefix}","ts_ms":1795239028962,"snapshot":"false","db":"shop","sequence":"[\"{lsn}\",\"{lsn}\"]","schema":{schema},"table":{table},"txId":1,"lsn":{lsn}}},"op":"c","ts_ms":1795239029422}}"#
    )
}

/// Source tables whose names collided under the old `<schema>_<table>` mirror names (and, for
/// the dotted ones, under a plain `schema.table` lake directory).
#[test]
fn tables_whose_names_collided_get_a_mirror_and_a_lake_directory_each() {
    run_test(async {
        let prefix = unique("names").replace('_', "-");
        let topic = format!("{prefix}.mixed");
        let tables = [
            ("public", "x_y"),
            ("x", "y"),
            ("a", "b_c"),
            ("a_b", "c"),
            ("a.b", "c"),
            ("a", "b.c"),
            ("public", "a.b_c"),
        ];
        let records: Vec<Fixture> = tables
            .iter()
            .enumerate()
            .map(|(i, (schema, table))| Fixture {
                topic: topic.clone(),
                partition: 0,
                offset: 0,
                key: Some(format!(r#"{{"id":{i}}}"#)),
                value: Some(envelope(&prefix, schema, table, i as i64, 100 + i as i64)),
            })
            .collect();
        produce(&records).await;

        let db = fresh_db("names").await;
        let lake = LakeTarget::local("names");
        let pod = Pod::start(config(&db, &prefix, &lake, &[]));
        let sink = pg(&db).await;
        // The raw log's and the state sink's checkpoints past the last record; stopping the pod
        // then commits the lake.
        let done = format!(
            "SELECT count(*) FROM cdc_lake.checkpoints WHERE kafka_topic = '{topic}' AND next_offset = {}",
            tables.len()
        );
        wait_until(
            "the raw and state checkpoints past the last record",
            Duration::from_secs(60),
            || async { count(&sink, &done).await == 2 },
        )
        .await;
        pod.stop().await;

        // The documented names (docs/naming.md): the table for `public`, `schema.table` otherwise,
        // with `.` and `\` inside a part escaped by `\`.
        let want_names = [
            "x_y", "x.y", "a.b_c", "a_b.c", "a\\.b.c", "a.b\\.c", "a\\.b_c",
        ];
        for (i, ((schema, table), name)) in tables.iter().zip(want_names).enumerate() {
            let got: Vec<(i64, String)> = pairs(
                &sink,
                &format!(
                    "SELECT id::bigint, who FROM cdc_processed.\"{}\"",
                    name.replace('"', "\"\"")
                ),
                &[],
            )
            .await;
            assert_eq!(
                got,
                vec![(i as i64, format!("{schema}/{table}"))],
                "mirror {name:?} holds exactly the row of {schema}.{table}"
            );
            let source: (String, String) = sink
                .query_one(
                    "SELECT source_schema, source_table FROM cdc_lake.mirror_sources WHERE mirror_table = $1",
                    &[&name],
                )
                .await
                .map(|r| (r.get(0), r.get(1)))
                .unwrap();
            assert_eq!(source, (schema.to_string(), table.to_string()));
        }
        let mirrors = count(
            &sink,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'cdc_processed'",
        )
        .await;
        assert_eq!(mirrors, tables.len() as i64, "one mirror per source table");

        // The lake: a directory per source table, each folding to that table's one row.
        let report = lake.check();
        let state = report["state"].as_object().unwrap();
        assert_eq!(state.len(), tables.len(), "{:?}", state.keys());
        for (schema, table) in tables {
            let rows: Vec<&Value> = state
                .values()
                .filter(|rows| {
                    rows.as_object()
                        .unwrap()
                        .values()
                        .any(|a| a["who"] == format!("{schema}/{table}"))
                })
                .collect();
            assert_eq!(
                rows.len(),
                1,
                "{schema}.{table} is in exactly one lake directory"
            );
            assert_eq!(rows[0].as_object().unwrap().len(), 1, "and alone there");
        }
    });
}
