//! The analytics layer (issue 6): declarative mappings into the seeds' bookstore facts and
//! dims, the ten views, the replica target, and a target in another database kept exactly once
//! across a pod crash. The live test runs real Debezium (the seeds' settings) on a source
//! database of its own, so its answers depend on nothing another test or run left behind.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cdc_lake::config::Config;
use cdc_lake::replay::{self, SourceKind};
use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;
use tokio_postgres::Client;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A Debezium connector (the seeds' settings) on a source database of its own; dropped with
/// its replication slot when the test ends, however it ends.
struct LiveSource {
    name: String,
    url: String,
}

fn lib_sh(cmd: &str) {
    let status = Command::new("bash")
        .arg("-c")
        .arg(format!("source '{REPO}/tools/lib.sh' && {cmd}"))
        .status()
        .unwrap();
    assert!(status.success(), "{cmd} failed");
}

impl LiveSource {
    async fn start(name: &str) -> LiveSource {
        let base = source_url();
        let admin_url = format!("{}/postgres", base.rsplit_once('/').unwrap().0);
        let admin = pg(&admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
        let db = pg(&url).await;
        for schema in ["ecomdb.sql", "inventorydb.sql"] {
            let sql =
                std::fs::read_to_string(Path::new(REPO).join("tools/source-schema").join(schema))
                    .unwrap();
            db.batch_execute(&sql).await.unwrap();
        }
        lib_sh(&format!(
            "rm -rf \"$CDC_LAKE_RUN/debezium/{name}\" && start_debezium {name} {name} {name} seed"
        ));
        LiveSource {
            name: name.to_string(),
            url,
        }
    }
}

/// The seeds' bookstore workload (tools/workload.py) against source database `db`: `ops` steps
/// at `rate` per second.
fn workload_command(db: &str, ops: u32, rate: u32, seed: u32) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(Path::new(REPO).join("tools/workload.py"))
        .args(["--ops", &ops.to_string(), "--seed", &seed.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--ecomdb", db, "--inventorydb", db]);
    cmd
}

async fn workload(db: &str, ops: u32, rate: u32, seed: u32) {
    let mut cmd = workload_command(db, ops, rate, seed);
    let status = tokio::task::spawn_blocking(move || cmd.status().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "workload failed");
}

impl Drop for LiveSource {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source '{REPO}/tools/lib.sh' && stop_debezium {0}; rm -rf \"$CDC_LAKE_RUN/debezium/{0}\"; \
                 psql -q -h 127.0.0.1 -p \"$SOURCE_PG_PORT\" -U postgres -d postgres \
                   -c \"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{0}'\" \
                   -c \"DROP DATABASE IF EXISTS {0} WITH (FORCE)\"",
                self.name
            ))
            .status();
    }
}

/// Rows of `sql` as sorted text lines, in UTC.
async fn rows(client: &Client, sql: &str) -> Vec<String> {
    client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let mut out: Vec<String> = client
        .query(&format!("SELECT r::text FROM ({sql}) r"), &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    out.sort();
    out
}

/// The replica's tables against the source's, column by column. Debezium under the seeds'
/// settings (time.precision.mode=connect) carries timestamps to the millisecond, so the
/// source's microseconds are cut to milliseconds on both sides (docs/fidelity.md).
const REPLICA_TABLES: &[(&str, &str)] = &[
    (
        "books",
        "SELECT id, title, author, price, description, cover_url, isbn, genre, published_year, date_trunc('milliseconds', created_at) FROM books",
    ),
    (
        "orders",
        "SELECT id, user_id, total, status, date_trunc('milliseconds', created_at) FROM orders",
    ),
    (
        "order_items",
        "SELECT id, order_id, book_id, quantity, price_at_purchase FROM order_items",
    ),
    ("book_notes", "SELECT id, book_title, note, revision FROM book_notes"),
    ("inventory", "SELECT book_id, quantity, reserved, updated_at FROM inventory"),
];

async fn replica_differences(source: &Client, replica: &Client) -> Vec<String> {
    let mut diffs = Vec::new();
    for (table, sql) in REPLICA_TABLES {
        let (want, got) = (rows(source, sql).await, rows(replica, sql).await);
        if want != got {
            diffs.push(format!(
                "{table}: source has {} rows, replica {}; first differences: {:?}",
                want.len(),
                got.len(),
                want.iter()
                    .zip(&got)
                    .filter(|(a, b)| a != b)
                    .take(2)
                    .collect::<Vec<_>>()
            ));
        }
    }
    diffs
}

/// Each view, and the same question asked of the source tables directly.
const VIEW_QUESTIONS: &[(&str, &str)] = &[
    (
        "vw_product_sales_volume",
        "SELECT i.book_id, b.title, sum(i.quantity)::bigint, count(DISTINCT i.order_id)
           FROM order_items i JOIN orders o ON o.id = i.order_id AND o.status <> 'CANCELLED'
           LEFT JOIN books b ON b.id = i.book_id GROUP BY i.book_id, b.title",
    ),
    (
        "vw_sales_over_time",
        "SELECT created_at::date, count(*), sum(total) FROM orders
          WHERE status <> 'CANCELLED' GROUP BY 1",
    ),
    (
        "vw_revenue_by_author",
        "SELECT coalesce(b.author, '(unknown)'), sum(i.quantity * i.price_at_purchase), sum(i.quantity)::bigint
           FROM order_items i JOIN orders o ON o.id = i.order_id AND o.status <> 'CANCELLED'
           LEFT JOIN books b ON b.id = i.book_id GROUP BY 1",
    ),
    (
        "vw_revenue_by_genre",
        "SELECT coalesce(b.genre, '(unknown)'), sum(i.quantity * i.price_at_purchase), sum(i.quantity)::bigint
           FROM order_items i JOIN orders o ON o.id = i.order_id AND o.status <> 'CANCELLED'
           LEFT JOIN books b ON b.id = i.book_id GROUP BY 1",
    ),
    (
        "vw_order_status_distribution",
        "SELECT status, count(*), round(100.0 * count(*) / sum(count(*)) OVER (), 2)
           FROM orders GROUP BY status",
    ),
    (
        "vw_inventory_health",
        "SELECT v.book_id, b.title, v.quantity, v.reserved, v.quantity - v.reserved,
                CASE WHEN v.quantity - v.reserved <= 0 THEN 'OUT_OF_STOCK'
                     WHEN v.quantity - v.reserved < 10 THEN 'LOW' ELSE 'OK' END
           FROM inventory v LEFT JOIN books b ON b.id = v.book_id",
    ),
    (
        "vw_avg_order_value",
        "SELECT count(*), coalesce(sum(total), 0), round(avg(total), 2) FROM orders
          WHERE status <> 'CANCELLED'",
    ),
    (
        "vw_top_books_by_revenue",
        "SELECT row_number() OVER (ORDER BY sum(i.quantity * i.price_at_purchase) DESC, i.book_id) AS rank,
                i.book_id, b.title, sum(i.quantity * i.price_at_purchase)
           FROM order_items i JOIN orders o ON o.id = i.order_id AND o.status <> 'CANCELLED'
           LEFT JOIN books b ON b.id = i.book_id GROUP BY i.book_id, b.title
          ORDER BY rank LIMIT 10",
    ),
    (
        "vw_inventory_turnover",
        "SELECT v.book_id, b.title, coalesce(s.units, 0), v.quantity,
                round(coalesce(s.units, 0)::numeric / nullif(v.quantity, 0), 2)
           FROM inventory v LEFT JOIN books b ON b.id = v.book_id
           LEFT JOIN (SELECT i.book_id, sum(i.quantity) AS units FROM order_items i
                        JOIN orders o ON o.id = i.order_id AND o.status <> 'CANCELLED'
                       GROUP BY i.book_id) s ON s.book_id = v.book_id",
    ),
    (
        "vw_book_price_distribution",
        "SELECT CASE WHEN price < 10 THEN '< 10' WHEN price < 20 THEN '10-20'
                     WHEN price < 30 THEN '20-30' WHEN price < 50 THEN '30-50' ELSE '50+' END,
                count(*), round(avg(price), 2)
           FROM books WHERE price IS NOT NULL GROUP BY 1",
    ),
];

async fn view_differences(source: &Client, analytics: &Client) -> Vec<String> {
    let mut diffs = Vec::new();
    for (view, question) in VIEW_QUESTIONS {
        let want = rows(source, question).await;
        if want.is_empty() {
            diffs.push(format!(
                "{view}: the source question has no rows to compare"
            ));
        }
        let got = rows(analytics, &format!("SELECT * FROM analytics.{view}")).await;
        if want != got {
            diffs.push(format!("{view}: source {want:?}\n  view {got:?}"));
        }
    }
    diffs
}

/// Every record of `topic` on the broker, as parsed values (tombstones left out).
/// Every record of `topic`, read to each partition's end: the broker's high watermark, or the
/// pod's checkpoint for the partition where that is further. tansu's watermark stays one short
/// after a batch that ends with a tombstone (ENVIRONMENT.md), so the watermark alone once ended
/// the read a record early; the checkpoint is the pod's own word on how far the log goes.
fn topic_values(topic: &str, checkpoints: &BTreeMap<i32, i64>) -> Vec<(i32, i64, Value)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .set("group.id", unique("analytics-read"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in meta.topics()[0].partitions() {
        let (_, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        let end = high.max(checkpoints.get(&p.id()).copied().unwrap_or(0));
        if end > 0 {
            assignment
                .add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
            ends.insert(p.id(), end);
        }
    }
    consumer.assign(&assignment).unwrap();
    let mut out = Vec::new();
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ends
        .iter()
        .any(|(p, h)| next.get(p).copied().unwrap_or(0) < *h)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "reading {topic} back: next offsets {next:?}, ends {ends:?}"
        );
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        next.insert(m.partition(), m.offset() + 1);
        if let Some(v) = m.payload() {
            out.push((
                m.partition(),
                m.offset(),
                serde_json::from_slice(v).unwrap(),
            ));
        }
    }
    out
}

/// Real Debezium traffic from the seeds' workload, through the demo's analytics and replica
/// targets (each in its own database), with the pod killed mid-stream and restarted:
/// - every view equals the same question asked of the source tables;
/// - the replica equals the source tables row for row;
/// - the order-events fact (one row per change) holds every change of the orders topic
///   exactly once, and the target's checkpoint lives in its own database.
#[test]
fn bookstore_views_and_replica_match_the_source_across_a_crash() {
    run_test(async {
        let name = unique("abk");
        // The topics exist before the pod subscribes: a topic appearing mid-run means a rebalance,
        // and the dev broker (tansu) cannot complete one that a killed member walks out of.
        let topics: BTreeSet<String> =
            ["books", "orders", "order_items", "book_notes", "inventory"]
                .iter()
                .map(|t| format!("{name}.public.{t}"))
                .collect();
        create_topics(&topics, 4).await;
        let live = LiveSource::start(&name).await;
        let source = pg(&live.url).await;
        let raw_db = fresh_db("analytics_raw").await;
        let analytics_db = fresh_db("analytics").await;
        let replica_db = fresh_db("replica").await;
        let lake = LakeTarget::local("analytics");
        let cfg = with_demo_targets(
            config(&raw_db, &name, &lake, &[]),
            (&name, &name),
            &[("analytics", &analytics_db), ("replica", &replica_db)],
        );
        let analytics = pg(&analytics_db).await;
        let replica = pg(&replica_db).await;

        let pod = Pod::start(cfg.clone());
        // A workload far longer than the test, stopped once the crash has landed: the crash
        // then always falls while changes flow, however slowly the pod starts (a fixed-size
        // workload once finished first on a loaded machine). Its transactions are the source's
        // own; one cut short by the stop rolls back there as well.
        let mut first = workload_command(&live.name, 1_000_000, 40, 11)
            .spawn()
            .expect("start the workload");
        wait_until(
            "order events in the analytics target (is Debezium running? tools/up --debezium)",
            Duration::from_secs(180),
            || async {
                count(
                    &analytics,
                    "SELECT count(*) FROM analytics.fact_order_events",
                )
                .await
                    > 0
            },
        )
        .await;
        // Crash mid-stream, while the workload still runs: the task is dropped wherever it is.
        pod.kill().await;
        let at_kill = count(
            &analytics,
            "SELECT count(*) FROM analytics.fact_order_events",
        )
        .await;
        assert!(
            first.try_wait().expect("the workload's status").is_none(),
            "the crash must land while changes still flow (the workload ended early)"
        );
        let pod = Pod::start(after_kill(&cfg));
        // More changes while the replacement catches up, then the stop.
        wait_until(
            "the replacement pod applying changes",
            Duration::from_secs(120),
            || async {
                count(
                    &analytics,
                    "SELECT count(*) FROM analytics.fact_order_events",
                )
                .await
                    > at_kill
            },
        )
        .await;
        first.kill().expect("stop the workload");
        first.wait().expect("the workload stopped");
        workload(&live.name, 150, 60, 12).await;

        // Caught up once the replica equals the source (Debezium is still sending when the
        // workload returns).
        let mut last = Vec::new();
        for _ in 0..600 {
            last = replica_differences(&source, &replica).await;
            if last.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(
            last.is_empty(),
            "the replica differs from the source:\n{}",
            last.join("\n")
        );
        let mut diffs = Vec::new();
        for _ in 0..100 {
            diffs = view_differences(&source, &analytics).await;
            if diffs.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(
            diffs.is_empty(),
            "views differ from the source:\n{}",
            diffs.join("\n")
        );
        let orders = count(&source, "SELECT count(*) FROM orders").await;
        let cancelled = count(
            &source,
            "SELECT count(*) FROM orders WHERE status = 'CANCELLED'",
        )
        .await;
        assert!(
            orders >= 100 && cancelled > 0,
            "the workload must give the views something to count ({orders} orders, {cancelled} cancelled)"
        );

        // Exactly once: one ledger row per insert/update/read of an order on the broker.
        let topic = format!("{name}.public.orders");
        let checkpoints: BTreeMap<i32, i64> = pairs(
            &analytics,
            "SELECT kafka_partition, max(next_offset) FROM cdc_lake.checkpoints
                  WHERE sink = 'state:analytics' AND kafka_topic = $1 GROUP BY 1",
            &[&topic],
        )
        .await;
        let expected: BTreeSet<(String, i64)> =
            tokio::task::spawn_blocking(move || topic_values(&topic, &checkpoints))
                .await
                .unwrap()
                .into_iter()
                .filter(|(_, _, v)| matches!(v["op"].as_str(), Some("c" | "u" | "r")))
                .map(|(_, _, v)| {
                    (
                        v["after"]["id"].as_str().unwrap().to_string(),
                        v["source"]["lsn"].as_i64().unwrap(),
                    )
                })
                .collect();
        let ledger: Vec<(String, i64)> = pairs(
            &analytics,
            "SELECT order_id::text, source_lsn FROM analytics.fact_order_events",
            &[],
        )
        .await;
        assert!(
            ledger.len() as i64 > at_kill,
            "changes after the crash were applied"
        );
        let ledger_set: BTreeSet<(String, i64)> = ledger.iter().cloned().collect();
        assert_eq!(ledger.len(), ledger_set.len(), "a change appears twice");
        let only_ledger: Vec<_> = ledger_set.difference(&expected).take(10).collect();
        let only_broker: Vec<_> = expected.difference(&ledger_set).take(10).collect();
        assert!(
            only_ledger.is_empty() && only_broker.is_empty(),
            "the ledger ({} rows) is not the broker's changes ({}): (order, lsn) only in the \
             ledger {only_ledger:?}, only on the broker {only_broker:?}",
            ledger_set.len(),
            expected.len()
        );
        let offsets = count(
            &analytics,
            "SELECT count(DISTINCT (kafka_partition, kafka_offset)) FROM analytics.fact_order_events",
        )
        .await;
        assert_eq!(offsets as usize, ledger.len());
        // The target's checkpoint lives with its data, not in the raw database.
        let raw = pg(&raw_db).await;
        assert!(
            count(
                &analytics,
                "SELECT count(*) FROM cdc_lake.checkpoints WHERE sink = 'state:analytics'"
            )
            .await
                > 0
        );
        assert_eq!(
            count(
                &raw,
                "SELECT count(*) FROM cdc_lake.checkpoints WHERE sink LIKE 'state:%'"
            )
            .await,
            0
        );
        // The status views: the target's sync summary in its database (its lag against the raw
        // log is unknown there), and events per table and operation in the raw database.
        assert!(
            count(
                &analytics,
                "SELECT count(*) FROM cdc_raw.cdc_sync_summary WHERE sink = 'state:analytics' AND behind_raw IS NULL AND since_last_update >= interval '0'"
            )
            .await
                > 0
        );
        let stats_updates = count(
            &raw,
            "SELECT coalesce(sum(events), 0)::bigint FROM cdc_raw.cdc_statistics WHERE source_table = 'public.orders' AND operation IN ('c', 'r')",
        )
        .await;
        assert_eq!(stats_updates, orders, "orders created, per cdc_statistics");
        // Source metadata, constants and the operation reached their columns.
        assert_eq!(
            count(
                &analytics,
                "SELECT count(*) FROM analytics.dim_books WHERE source_system = 'ecomdb' AND source_lsn > 0"
            )
            .await,
            count(&source, "SELECT count(*) FROM books").await
        );
        assert_eq!(
            count(
                &replica,
                "SELECT count(*) FROM orders WHERE __cdc_operation IN ('c','u','r') AND __cdc_timestamp IS NOT NULL AND __synced_at >= __cdc_timestamp"
            )
            .await,
            orders
        );
        pod.stop().await;

        // cdc-replay rebuilds mapped targets through the same mappings: the analytics target from
        // the raw log, the replica from the lake, each emptied first.
        for (target, source_kind) in [
            ("analytics", SourceKind::Raw),
            ("replica", SourceKind::Lake),
        ] {
            let summary = replay::run(&cfg, &rebuild_args(target, source_kind))
                .await
                .unwrap_or_else(|e| panic!("rebuilding {target}: {e:#}"));
            assert!(summary.stats.written > 0, "{target}: nothing replayed");
        }
        let diffs = view_differences(&source, &analytics).await;
        assert!(diffs.is_empty(), "after the rebuild:\n{}", diffs.join("\n"));
        let rebuilt = count(
            &analytics,
            "SELECT count(*) FROM analytics.fact_order_events",
        )
        .await;
        assert_eq!(rebuilt as usize, ledger.len());
        let diffs = replica_differences(&source, &replica).await;
        assert!(diffs.is_empty(), "after the rebuild:\n{}", diffs.join("\n"));
        drop(live);
    });
}

/// A mapping that does not fit its table stops start-up with a message naming the mapping
/// and the column: an unknown column, a key without a unique index, a transform whose result
/// the column cannot hold, a constant of the wrong type, a filter over a missing column.
#[test]
fn mappings_that_do_not_fit_stop_start_up_with_a_precise_message() {
    run_test(async {
        let raw_db = fresh_db("badmap_raw").await;
        let target_db = fresh_db("badmap").await;
        let lake = LakeTarget::local("badmap");
        let dir = std::env::temp_dir().join(unique("badmap"));
        std::fs::create_dir_all(&dir).unwrap();
        let setup = dir.join("setup.sql");
        std::fs::write(
            &setup,
            "CREATE SCHEMA IF NOT EXISTS bi;
             CREATE TABLE IF NOT EXISTS bi.orders (order_id uuid PRIMARY KEY, n integer, note text, day date);
             CREATE TABLE IF NOT EXISTS bi.no_key (order_id uuid, n integer);",
        )
        .unwrap();
        let cases = [
            (
                "no_such = \"id\"",
                "orders",
                "unknown column no_such: bi.orders has no such column (it has: order_id, n, note, day)",
            ),
            (
                "n = { from = \"created_at\", transform = \"epoch_ms\" }",
                "orders",
                "column n: cannot convert: it produces a timestamp, which a column of type integer cannot hold",
            ),
            (
                "n = { value = \"many\" }",
                "orders",
                "column n: the constant \"many\" cannot be converted to integer",
            ),
            (
                "note = { source = \"lsn\" }\nday = { meta = \"kafka_topic\" }",
                "orders",
                "column day: cannot convert: it produces text, which a column of type date cannot hold",
            ),
            (
                "n = \"quantity\"",
                "no_key",
                "missing key: bi.no_key has no primary key or unique index on (order_id)",
            ),
        ];
        for (columns, table, want) in cases {
            let toml_text = format!(
                "[kafka]\nbrokers = \"{broker}\"\ntopics = [\"unused\"]\n[postgres]\nurl = \"{raw_db}\"\n[lake]\nroot = \"{lake_dir}\"\n[http]\nlisten = \"\"\n\
                 [targets.bi]\nurl = \"{target_db}\"\nschema = \"bi\"\nsetup_sql = [\"setup.sql\"]\n\
                 [[targets.bi.mappings]]\ntopic = \"x.public.orders\"\ntable = \"{table}\"\nkey = [\"order_id\"]\n\
                 [targets.bi.mappings.columns]\norder_id = \"id\"\n{columns}\n",
                broker = broker(),
                lake_dir = match &lake {
                    LakeTarget::Local(d) => d.display().to_string(),
                    _ => unreachable!(),
                },
            );
            let path = dir.join("config.toml");
            std::fs::write(&path, toml_text).unwrap();
            let cfg = Config::load_with_env(Some(&path), Vec::<(String, String)>::new()).unwrap();
            let err = tokio::time::timeout(
                Duration::from_secs(30),
                cdc_lake::ingest::run(cfg, Default::default(), false),
            )
            .await
            .expect("start-up fails at once")
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("targets.bi.mappings[0]") && err.contains(want),
                "want {want:?} in: {err}"
            );
        }
        // The same mapping, fitting, starts.
        let ok = format!(
            "[kafka]\nbrokers = \"{}\"\ntopics = [\"unused\"]\n[postgres]\nurl = \"{raw_db}\"\n[http]\nlisten = \"\"\n\
             [targets.bi]\nurl = \"{target_db}\"\nschema = \"bi\"\nsetup_sql = [\"setup.sql\"]\n\
             [[targets.bi.mappings]]\ntopic = \"x.public.orders\"\ntable = \"orders\"\nkey = [\"order_id\"]\n\
             columns = {{ order_id = \"id\", n = \"quantity\", day = {{ from = \"created_at\", transform = \"epoch_ms\" }} }}\n",
            broker()
        );
        let path = dir.join("ok.toml");
        std::fs::write(&path, ok).unwrap();
        let cfg = Config::load_with_env(Some(&path), Vec::<(String, String)>::new()).unwrap();
        cdc_lake::ingest::migrate(&cfg).await.unwrap();
        let target = pg(&target_db).await;
        assert_eq!(
            count(
                &target,
                "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'bi' AND table_name = 'orders' AND column_name = '__cdc_position'"
            )
            .await,
            1,
            "the ordering guard column is added"
        );
    });
}

/// Filters and delete policies, on the captured Debezium samples (seeds' settings): the
/// expected rows are folded from the same records.
#[test]
fn filters_and_delete_policies_follow_the_mapping() {
    run_test(async {
        let prefix = unique("apol");
        let mut records = load_fixture("bookstore-seed.ndjson");
        retopic(&mut records, &prefix);
        let raw_db = fresh_db("apol_raw").await;
        let target_db = fresh_db("apol").await;
        let lake = LakeTarget::local("apol");
        let dir = std::env::temp_dir().join(unique("apol"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("setup.sql"),
            "CREATE SCHEMA IF NOT EXISTS p;
             CREATE TABLE IF NOT EXISTS p.open_orders (order_id uuid PRIMARY KEY, status text, created_at timestamptz, topic text);
             CREATE TABLE IF NOT EXISTS p.inv_delete (book_id uuid PRIMARY KEY, quantity integer);
             CREATE TABLE IF NOT EXISTS p.inv_soft (book_id uuid PRIMARY KEY, quantity integer);
             CREATE TABLE IF NOT EXISTS p.inv_ignore (book_id uuid PRIMARY KEY, quantity integer);",
        )
        .unwrap();
        let inv = |table: &str, delete: &str| {
            format!(
                "[[targets.p.mappings]]\ntopic = '^{prefix}\\.public\\.inventory$'\ntable = \"{table}\"\nkey = [\"book_id\"]\ndelete = \"{delete}\"\n\
                 columns = {{ book_id = \"book_id\", quantity = \"quantity\" }}\n"
            )
        };
        let toml_text = format!(
            "[kafka]\nbrokers = \"{}\"\ntopics = [\"unused\"]\n[postgres]\nurl = \"{raw_db}\"\n\
             [targets.p]\nurl = \"{target_db}\"\nschema = \"p\"\nsetup_sql = [\"setup.sql\"]\n\
             [[targets.p.mappings]]\ntopic = \"{prefix}.public.orders\"\ntable = \"open_orders\"\nkey = [\"order_id\"]\n\
             filter = \"status <> 'CANCELLED'\"\n\
             columns = {{ order_id = \"id\", status = \"status\", created_at = {{ from = \"created_at\", transform = \"epoch_ms\" }}, topic = {{ meta = \"kafka_topic\" }} }}\n\
             {}{}{}",
            broker(),
            inv("inv_delete", "delete"),
            inv("inv_soft", "soft"),
            inv("inv_ignore", "ignore"),
        );
        std::fs::write(dir.join("config.toml"), toml_text).unwrap();
        let file_cfg = Config::load_with_env(
            Some(&dir.join("config.toml")),
            Vec::<(String, String)>::new(),
        )
        .unwrap();
        let mut cfg = config(&raw_db, &prefix, &lake, &[]);
        cfg.targets = file_cfg.targets;

        // The reference: last image per key, and which keys were deleted.
        let mut orders: BTreeMap<String, Value> = BTreeMap::new();
        let mut inventory: BTreeMap<String, Option<Value>> = BTreeMap::new();
        let mut inventory_seen: BTreeMap<String, Value> = BTreeMap::new();
        for r in &records {
            let Some(v) = r
                .value
                .as_deref()
                .map(|v| serde_json::from_str::<Value>(v).unwrap())
            else {
                continue;
            };
            let after = v["after"].clone();
            if r.topic.ends_with(".orders") && after.is_object() {
                orders.insert(after["id"].as_str().unwrap().into(), after);
            } else if r.topic.ends_with(".inventory") {
                let key = if after.is_object() {
                    &after
                } else {
                    &v["before"]
                }["book_id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                if after.is_object() {
                    inventory_seen.insert(key.clone(), after.clone());
                }
                inventory.insert(key, after.is_object().then_some(after));
            }
        }

        produce(&records).await;
        let pod = Pod::start(cfg);
        let target = pg(&target_db).await;
        let live_keys = inventory.values().filter(|v| v.is_some()).count() as i64;
        wait_until("the mapped tables", Duration::from_secs(90), || async {
            count(&target, "SELECT count(*) FROM p.inv_delete").await == live_keys
                && count(&target, "SELECT count(*) FROM p.inv_ignore").await
                    == inventory_seen.len() as i64
        })
        .await;
        pod.stop().await;

        // Filter: only orders whose last status is not CANCELLED, with their last status.
        let open: BTreeSet<(String, String, i64, String)> = orders
            .iter()
            .filter(|(_, a)| a["status"] != "CANCELLED")
            .map(|(id, a)| {
                (
                    id.clone(),
                    a["status"].as_str().unwrap().to_string(),
                    a["created_at"].as_i64().unwrap(),
                    format!("{prefix}.public.orders"),
                )
            })
            .collect();
        let got: BTreeSet<(String, String, i64, String)> = target
            .query(
                "SELECT order_id::text, status, (extract(epoch FROM created_at) * 1000)::bigint, topic FROM p.open_orders",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        assert!(orders.len() > open.len() && !open.is_empty());
        assert_eq!(got, open);

        // Delete policies: delete removes, soft marks, ignore keeps the last image.
        let deleted: BTreeSet<String> = inventory
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        assert!(!deleted.is_empty(), "the samples hold an inventory delete");
        let keys = |sql: &'static str| {
            let target = &target;
            async move {
                target
                    .query(sql, &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1)))
                    .collect::<BTreeSet<(String, i32)>>()
            }
        };
        let last: BTreeSet<(String, i32)> = inventory_seen
            .iter()
            .map(|(k, a)| (k.clone(), a["quantity"].as_i64().unwrap() as i32))
            .collect();
        let remaining: BTreeSet<(String, i32)> = last
            .iter()
            .filter(|(k, _)| !deleted.contains(k))
            .cloned()
            .collect();
        assert_eq!(
            keys("SELECT book_id::text, quantity FROM p.inv_delete").await,
            remaining
        );
        assert_eq!(
            keys("SELECT book_id::text, quantity FROM p.inv_ignore").await,
            last
        );
        assert_eq!(
            keys("SELECT book_id::text, quantity FROM p.inv_soft WHERE NOT __cdc_deleted").await,
            remaining
        );
        let soft_deleted: BTreeSet<String> =
            keys("SELECT book_id::text, quantity FROM p.inv_soft WHERE __cdc_deleted")
                .await
                .into_iter()
                .map(|(k, _)| k)
                .collect();
        assert_eq!(soft_deleted, deleted);
    });
}
