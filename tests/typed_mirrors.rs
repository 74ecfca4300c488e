//! Typed mirrors from schemaless input (issue 14): with the seeds' settings Debezium sends
//! dates and timestamps as epoch numbers and decimals as doubles. A mirror column that already
//! has a real type (created by the user, or declared in `state.column_types`) gets the value
//! converted to it, per the connector's `time.precision.mode`.
//!
//! Input: the captured seed samples (real Debezium 3.6.3, schemaless). Oracle: the broker's
//! records as the raw log holds them (the digits Debezium sent), converted by PostgreSQL's own
//! functions (`to_timestamp`, `::numeric`), compared with the mirror, types included.
mod common;

use std::time::Duration;

use common::*;

#[test]
fn schemaless_values_take_the_mirror_columns_types() {
    run_test(async {
        let prefix = unique("typed").replace('_', "-");
        let mut records = load_fixture("bookstore-seed.ndjson");
        retopic(&mut records, &prefix);
        records
            .retain(|r| r.topic.ends_with(".public.orders") || r.topic.ends_with(".public.books"));
        let n_orders = records
            .iter()
            .filter(|r| r.topic.ends_with(".orders"))
            .count();
        let n_books = records.len() - n_orders;
        produce(&records).await;

        let db = fresh_db("typed").await;
        let sink = pg(&db).await;
        // The user's own mirror of orders, without cdc-lake's metadata columns.
        sink.batch_execute(
            "CREATE SCHEMA cdc_processed;
             CREATE TABLE cdc_processed.orders (id uuid PRIMARY KEY, user_id text, total numeric(10,2),
                                                status text, created_at timestamptz)",
        )
        .await
        .unwrap();
        let lake = LakeTarget::local("typed");
        let pod = Pod::start(config(
            &db,
            &prefix,
            &lake,
            &[
                ("CDC_LAKE__STATE__TIME_PRECISION_MODE", "connect"),
                (
                    "CDC_LAKE__STATE__COLUMN_TYPES",
                    r#"{"public.books" = {id = "uuid", price = "numeric(8,2)", created_at = "timestamp with time zone"}}"#,
                ),
            ],
        ));
        for (table, n) in [("orders", n_orders), ("books", n_books)] {
            let done = format!(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM cdc_lake.checkpoints WHERE sink = 'state' AND kafka_topic = '{prefix}.public.{table}'"
            );
            wait_until(
                &format!("the state checkpoint of {table}"),
                Duration::from_secs(60),
                || async { count(&sink, &done).await == n as i64 },
            )
            .await;
        }
        pod.stop().await;
        assert_eq!(
            count(&sink, "SELECT count(*) FROM cdc_raw.cdc_rejects").await,
            0,
            "nothing rejected"
        );

        let types = |table: &'static str| {
            let sink = &sink;
            async move {
                sink.query(
                    "SELECT a.attname::text || ' ' || format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                        AND a.attname IN ('id', 'total', 'price', 'created_at') ORDER BY 1",
                    &[&table],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            types("cdc_processed.orders").await,
            [
                "created_at timestamp with time zone",
                "id uuid",
                "total numeric(10,2)"
            ]
        );
        assert_eq!(
            types("cdc_processed.books").await,
            [
                "created_at timestamp with time zone",
                "id uuid",
                "price numeric(8,2)"
            ]
        );

        // Each mirror row against the newest raw image of its key, converted by PostgreSQL.
        for (table, number) in [("orders", "total"), ("books", "price")] {
            let mismatches = count(
                &sink,
                &format!(
                    "WITH newest AS (
                       SELECT DISTINCT ON (event_key) after_data AS a FROM cdc_raw.cdc_events
                        WHERE source_table = 'public.{table}' AND after_data IS NOT NULL
                        ORDER BY event_key, kafka_partition, kafka_offset DESC)
                     SELECT count(*) FROM newest n
                       FULL JOIN cdc_processed.{table} m ON m.id = (n.a->>'id')::uuid
                      WHERE m.id IS NULL OR n.a IS NULL
                         OR m.created_at IS DISTINCT FROM to_timestamp((n.a->>'created_at')::bigint / 1000.0)
                         OR m.{number} IS DISTINCT FROM round((n.a->>'{number}')::numeric, 2)"
                ),
            )
            .await;
            assert_eq!(
                mismatches, 0,
                "cdc_processed.{table} equals the converted raw images"
            );
        }
        let rows = count(&sink, "SELECT count(*) FROM cdc_processed.orders").await;
        assert!(rows > 0, "orders mirrored");
    });
}
