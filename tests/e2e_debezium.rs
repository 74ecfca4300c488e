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

/// A TOASTed column that did not change arrives as Debezium's placeholder; the mirror keeps the
/// stored text instead of writing the placeholder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toasted_text_is_kept() {
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
}
