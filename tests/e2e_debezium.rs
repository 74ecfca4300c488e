//! End to end with real Debezium (tools/up --debezium): a row inserted, updated and deleted in
//! the source PostgreSQL appears in cdc_processed within 5 seconds each time, the seeds' own
//! acceptance criterion.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn source_url() -> String {
    std::env::var("CDC_LAKE_TEST_SOURCE_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/ecomdb".into())
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_delete_visible_within_five_seconds() {
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
    let by_id =
        |cond: &str| format!("SELECT count(*) FROM cdc_processed.books WHERE id = '{id}' {cond}");
    let insert = visible_within(&sink, "the insert", &by_id("AND price = 10.25"), 1, five).await;

    source
        .execute(
            "UPDATE books SET price = 11.75 WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .unwrap();
    let update = visible_within(&sink, "the update", &by_id("AND price = 11.75"), 1, five).await;

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
}
