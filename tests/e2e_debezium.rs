//! End to end with real Debezium (tools/up --debezium): a row inserted, updated and deleted in
//! the source PostgreSQL appears in cdc_processed within 5 seconds each time, the seeds' own
//! acceptance criterion.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Waits for `sql` (returning one bigint) to equal `want`; returns how long it took.
async fn visible_within(
    client: &tokio_postgres::Client,
    what: &str,
    sql: &str,
    want: i64,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    wait_until(what, limit, || async { count(client, sql).await == want }).await;
    start.elapsed()
}

#[test]
fn insert_update_delete_visible_within_five_seconds() {
    run_test(async {
        let source = pg(&source_url()).await;
        let db = fresh_db("e2e").await;
        let lake = LakeTarget::local("e2e");
        let pod = Pod::start(config(&db, "ecom-connector", &lake, &[]));
        let sink = pg(&db).await;

        // Warm-up: the pod first catches up with the topics' history and joins the group.
        let warm = unique("warm");
        source
            .execute(
                "INSERT INTO books (title, author, price) VALUES ($1, 'e2e', 1.00)",
                &[&warm],
            )
            .await
            .unwrap();
        let warm_sql = format!("SELECT count(*) FROM cdc_processed.books WHERE title = '{warm}'");
        visible_within(
            &sink,
            "the warm-up row (is Debezium running? tools/up --debezium)",
            &warm_sql,
            1,
            Duration::from_secs(120),
        )
        .await;

        let title = unique("e2e_book");
        let five = Duration::from_secs(5);
        let id: String = source
            .query_one("INSERT INTO books (title, author, price, genre) VALUES ($1, 'e2e', 10.25, 'Test') RETURNING id::text", &[&title])
            .await
            .unwrap()
            .get(0);
        let by_id = |cond: &str| {
            format!("SELECT count(*) FROM cdc_processed.books WHERE id = '{id}' {cond}")
        };
        let insert =
            visible_within(&sink, "the insert", &by_id("AND price = 10.25"), 1, five).await;

        source
            .execute(
                "UPDATE books SET price = 11.75 WHERE id = $1::text::uuid",
                &[&id],
            )
            .await
            .unwrap();
        let update =
            visible_within(&sink, "the update", &by_id("AND price = 11.75"), 1, five).await;

        source
            .execute("DELETE FROM books WHERE id = $1::text::uuid", &[&id])
            .await
            .unwrap();
        let delete = visible_within(&sink, "the delete", &by_id(""), 0, five).await;
        println!("produce-to-visible: insert {insert:?}, update {update:?}, delete {delete:?}");

        // The raw log holds all three changes of that row, in order.
        let ops: Vec<String> = sink
            .query(
                "SELECT operation FROM cdc_raw.cdc_events WHERE event_key->>'id' = $1 ORDER BY commit_lsn, source_lsn",
                &[&id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(ops, vec!["c", "u", "d"]);
        pod.stop().await;
    });
}

/// A TOASTed column that did not change arrives as Debezium's placeholder; the mirror keeps the
/// stored text instead of writing the placeholder.
#[test]
fn unchanged_toasted_text_is_kept() {
    run_test(async {
        let source = pg(&source_url()).await;
        let db = fresh_db("toast").await;
        let lake = LakeTarget::local("toast");
        let pod = Pod::start(config(&db, "ecom-connector", &lake, &[]));
        let sink = pg(&db).await;

        let title = unique("toast");
        // ~9.6 kB of hex from md5s compresses poorly, so PostgreSQL stores it out of line.
        let id: i32 = source
            .query_one(
                "INSERT INTO book_notes (book_title, note)
                 SELECT $1, string_agg(md5(random()::text), '') FROM generate_series(1, 300) RETURNING id",
                &[&title],
            )
            .await
            .unwrap()
            .get(0);
        let note: String = source
            .query_one("SELECT note FROM book_notes WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        let row = |cond: &str| {
            format!("SELECT count(*) FROM cdc_processed.book_notes WHERE id = {id} {cond}")
        };
        visible_within(
            &sink,
            "the note (is Debezium running? tools/up --debezium)",
            &row(""),
            1,
            Duration::from_secs(120),
        )
        .await;

        source
            .execute("UPDATE book_notes SET revision = 2 WHERE id = $1", &[&id])
            .await
            .unwrap();
        visible_within(
            &sink,
            "the revision update",
            &row("AND revision = 2"),
            1,
            Duration::from_secs(10),
        )
        .await;

        // The update really carried the placeholder (otherwise this test proves nothing)...
        let placeholder: String = sink
            .query_one(
                "SELECT after_data->>'note' FROM cdc_raw.cdc_events
                  WHERE source_table = 'public.book_notes' AND operation = 'u' AND (event_key->>'id')::int = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(placeholder, "__debezium_unavailable_value");
        // ...and the mirror kept the stored text.
        let mirrored: String = sink
            .query_one(
                "SELECT note FROM cdc_processed.book_notes WHERE id = $1::int4",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(mirrored.len(), note.len());
        assert_eq!(
            mirrored, note,
            "the unchanged TOASTed note survives the update"
        );
        pod.stop().await;
    });
}

/// Schema evolution with real Debezium: a column added in the source becomes a mirror column
/// and a lake column, and later rows carry it.
#[test]
fn an_added_source_column_reaches_mirror_and_lake() {
    run_test(async {
        let source = pg(&source_url()).await;
        let table = unique("evolve");
        source
            .batch_execute(&format!(
                "CREATE TABLE {table} (id int PRIMARY KEY, name text);
                 INSERT INTO {table} VALUES (1, 'before the change')"
            ))
            .await
            .unwrap();
        let db = fresh_db("evolve").await;
        let lake = LakeTarget::local("evolve");
        let pod = Pod::start(config(&db, "ecom-connector", &lake, &[]));
        let sink = pg(&db).await;
        visible_within(
            &sink,
            "the new table's first row (is Debezium running? tools/up --debezium)",
            &format!("SELECT count(*) FROM cdc_processed.{table}"),
            1,
            Duration::from_secs(120),
        )
        .await;

        source
            .batch_execute(&format!(
                "ALTER TABLE {table} ADD COLUMN rating int;
                 INSERT INTO {table} VALUES (2, 'after the change', 5)"
            ))
            .await
            .unwrap();
        visible_within(
            &sink,
            "the row with the added column",
            &format!("SELECT count(*) FROM cdc_processed.{table} WHERE rating = 5"),
            1,
            Duration::from_secs(10),
        )
        .await;
        let old: Option<i64> = sink
            .query_one(
                &format!("SELECT rating FROM cdc_processed.{table} WHERE id = 1"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(old, None, "the earlier row has no value for the new column");
        pod.stop().await;

        // The lake (read by pyarrow) has the new column in the table's latest row.
        let report = lake.check();
        let latest = &report["sample"][format!("public.{table}")];
        assert_eq!(latest["rating"], 5, "{latest}");
        assert_eq!(latest["name"], "after the change");
        source
            .batch_execute(&format!("DROP TABLE {table}"))
            .await
            .unwrap();
    });
}

/// Schema evolution the mirror cannot absorb: a source column changes from integer to text.
/// A value the mirror's integer column cannot hold is rejected with a reason naming the table
/// and the column, later rows that fit still apply, and the raw log and the lake keep all of
/// them (the lake in a new file with the new type).
#[test]
fn a_changed_column_type_rejects_what_does_not_fit_and_continues() {
    run_test(async {
        let source = pg(&source_url()).await;
        let table = unique("retype");
        source
            .batch_execute(&format!(
                "CREATE TABLE {table} (id int PRIMARY KEY, v int);
                 INSERT INTO {table} VALUES (1, 7)"
            ))
            .await
            .unwrap();
        let db = fresh_db("retype").await;
        let lake = LakeTarget::local("retype");
        let pod = Pod::start(config(&db, "ecom-connector", &lake, &[]));
        let sink = pg(&db).await;
        visible_within(
            &sink,
            "the first row (is Debezium running? tools/up --debezium)",
            &format!("SELECT count(*) FROM cdc_processed.{table}"),
            1,
            Duration::from_secs(120),
        )
        .await;
        source
            .batch_execute(&format!(
                "ALTER TABLE {table} ALTER COLUMN v TYPE text;
                 INSERT INTO {table} VALUES (2, 'not a number');
                 INSERT INTO {table} VALUES (3, '42')"
            ))
            .await
            .unwrap();
        visible_within(
            &sink,
            "the row that still fits",
            &format!("SELECT count(*) FROM cdc_processed.{table} WHERE id = 3 AND v = 42"),
            1,
            Duration::from_secs(10),
        )
        .await;
        pod.stop().await;
        // The shared topics may hold earlier runs' tables too: only this table's rejects count.
        let reason: String = sink
            .query_one(
                "SELECT reason FROM cdc_raw.cdc_rejects WHERE stage = 'state' AND kafka_topic = $1",
                &[&format!("ecom-connector.public.{table}")],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            reason.contains(&format!("cdc_processed.{table}")) && reason.contains("column v"),
            "{reason}"
        );
        assert_eq!(
            count(
                &sink,
                &format!(
                    "SELECT count(*) FROM cdc_raw.cdc_events WHERE source_table = 'public.{table}'"
                )
            )
            .await,
            3
        );
        let report = lake.check();
        let coords = lake_coords(&report);
        assert_eq!(
            coords
                .iter()
                .filter(|(t, ..)| t.ends_with(&format!(".{table}")))
                .count(),
            3,
            "the lake keeps every change"
        );
        // The text values went to a new file typed for text, not into the integer column as nulls.
        // A Delta table keeps one type per column, so there the new file names the column
        // `v__string` (lake/README.md); every row holds its value in exactly one of the two.
        let LakeTarget::Local(dir) = &lake else {
            unreachable!()
        };
        let read = std::process::Command::new(python())
            .args([
                "-c",
                "import glob, json, sys, pyarrow.parquet as pq\n\
                 vs = []\n\
                 for f in glob.glob(sys.argv[1] + '/date=*/*.parquet'):\n\
                 \x20   for r in pq.read_table(f).column('after').to_pylist():\n\
                 \x20       held = [x for k, x in r.items() if (k == 'v' or k.startswith('v__')) and x is not None]\n\
                 \x20       assert len(held) == 1, r\n\
                 \x20       vs.append(held[0])\n\
                 print(json.dumps(sorted(vs, key=str)))",
                &format!("{}/cdc_events/table=public.{table}", dir.display()),
            ])
            .output()
            .unwrap();
        let values: serde_json::Value = serde_json::from_slice(&read.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&read.stderr)));
        assert_eq!(values, serde_json::json!(["42", 7, "not a number"]));
        source
            .batch_execute(&format!("DROP TABLE {table}"))
            .await
            .unwrap();
    });
}

/// `tools/verify-cdc` (the seeds' verify-cdc.sh): a book inserted into the source reaches the
/// analytics target (the demo's `dim_books` mapping) within 5 s while the pod runs: exit 0;
/// exit 1 with a clear message once the pod is stopped.
#[test]
fn verify_cdc_passes_with_the_pod_and_fails_without() {
    run_test(async {
        let db = fresh_db("verifycdc").await;
        let analytics_db = fresh_db("verifycdc_bi").await;
        let lake = LakeTarget::local("verifycdc");
        let cfg = with_demo_targets(
            config(&db, "ecom-connector", &lake, &[]),
            ("ecom-connector", "inventory-connector"),
            &[("analytics", &analytics_db)],
        );
        let pod = Pod::start(cfg);
        let analytics = pg(&analytics_db).await;
        // The pod first catches up with the topics' history.
        wait_until("the books dimension", Duration::from_secs(120), || async {
            count(&analytics, "SELECT count(*) FROM analytics.dim_books").await > 0
        })
        .await;
        let tool = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/verify-cdc");
        let run = || {
            let out = std::process::Command::new(&tool)
                .env("ANALYTICS_PG_URL", &analytics_db)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string(),
            )
        };
        let (code, out) = run();
        assert_eq!(code, Some(0), "{out}");
        assert!(out.starts_with("OK:"), "{out}");
        pod.stop().await;
        let (code, out) = run();
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("FAIL:") && out.contains("ingest pod"), "{out}");
    });
}
