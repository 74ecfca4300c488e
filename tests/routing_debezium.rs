//! Routing with real Debezium (tools/up --debezium): three filters send the bookstore's changes
//! to three topics while the pod runs as a process, a second pod joins the group and leaves it
//! again (two rebalances), and the first is killed with SIGKILL mid-stream and replaced. An
//! independent consumer reads each output topic; its content must be exactly the changes of
//! the raw log that satisfy the filter (computed in SQL here), each once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tokio_postgres::Client;

/// A pod as an operating-system process (`cdc-lake ingest`), so that SIGKILL is a real crash.
struct PodProcess {
    child: Child,
    metrics: String,
}

impl PodProcess {
    fn start(cfg: &cdc_lake::config::Config, metrics_port: u16) -> Self {
        let mut cfg = cfg.clone();
        let metrics = format!("127.0.0.1:{metrics_port}");
        cfg.http.listen = metrics.clone();
        let path = std::env::temp_dir().join(format!("{}.toml", unique("route-pod")));
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        let log = std::fs::File::create(path.with_extension("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cdc-lake"))
            .args(["--config", path.to_str().unwrap(), "ingest"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child, metrics }
    }

    /// Records this pod consumed (its own /metrics).
    fn consumed(&self) -> u64 {
        // Not listening (or not answering) yet: nothing consumed.
        match try_http_get(&self.metrics, "/metrics") {
            Ok((200, page)) => metric_total(&page, "cdc_lake_records_consumed_total") as u64,
            _ => 0,
        }
    }

    fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM: drain, commit, leave the group.
    fn terminate(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "the pod ended with {status}");
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the pod did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ROUTES: &str = "filters:
  - id: cancellations
    consumer: finance
    tables: [public.orders]
    when:
      and:
        - { field: after.status, equals: CANCELLED }
        - { field: after.total, greaterThan: \"100.00\" }
    topic: OUT-cancellations
  - id: cheap-scifi
    consumer: storefront
    tables: ['^public\\.books$']
    ops: [r, c, u]
    when:
      and:
        - { field: after.genre, in: [SciFi] }
        - { field: after.price, lessThanOrEqual: 10 }
    topic: OUT-cheap-scifi
    output: after
  - id: removals
    consumer: audit
    ops: [d]
    when:
      or:
        - { field: table, equals: public.books }
        - { field: before.id, lessThan: 150 }
    topic: OUT-removals
";

/// Each filter's matches, computed from the raw log with SQL over the stored row images.
const ORACLE: [(&str, &str); 3] = [
    (
        "cancellations",
        "source_table = 'public.orders' AND after_data->>'status' = 'CANCELLED' AND (after_data->>'total')::numeric > 100.00",
    ),
    (
        "cheap-scifi",
        "source_table = 'public.books' AND operation IN ('r', 'c', 'u') AND after_data->>'genre' = 'SciFi' AND (after_data->>'price')::numeric <= 10",
    ),
    (
        "removals",
        "operation = 'd' AND (source_table = 'public.books' OR (before_data->>'id')::int < 150)",
    ),
];

async fn matching(
    sink: &Client,
    topic_prefix: &str,
    condition: &str,
) -> BTreeSet<(String, i32, i64)> {
    sink.query(
        &format!(
            "SELECT kafka_topic, kafka_partition, kafka_offset FROM cdc_raw.cdc_events
              WHERE kafka_topic LIKE '{topic_prefix}.%' AND {condition}"
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// One round of source traffic: orders of every status and total, books of two genres, then
/// updates and deletes of both, in separate transactions.
async fn traffic(src: &Client, round: i32) {
    let base = round * 100;
    src.batch_execute(&format!(
        "INSERT INTO orders SELECT {base} + i, CASE WHEN i % 3 = 0 THEN 'CANCELLED' ELSE 'CONFIRMED' END,
                (i * 7.31)::numeric(10,2) FROM generate_series(1, 60) i;
         INSERT INTO books SELECT {base} + i, 'book ' || i, CASE WHEN i % 2 = 0 THEN 'SciFi' ELSE 'Classic' END,
                (i * 0.75)::numeric(10,2) FROM generate_series(1, 30) i;"
    ))
    .await
    .unwrap();
    for i in 1..=20 {
        src.batch_execute(&format!(
            "UPDATE orders SET status = 'CANCELLED', total = total + 50 WHERE id = {base} + {i};
             UPDATE books SET price = price + 3 WHERE id = {base} + {i};"
        ))
        .await
        .unwrap();
    }
    src.batch_execute(&format!(
        "DELETE FROM orders WHERE id BETWEEN {base} + 50 AND {base} + 55;
         DELETE FROM books WHERE id BETWEEN {base} + 25 AND {base} + 27;"
    ))
    .await
    .unwrap();
}

#[test]
fn three_filters_route_real_changes_once_across_a_rebalance_and_a_kill() {
    run_test(async {
        let stem = unique("route").replace('_', "");
        let admin = pg(&format!("{}/postgres", source_base())).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {stem}"))
            .await
            .unwrap();
        let src = pg(&format!("{}/{stem}", source_base())).await;
        src.batch_execute(
            "CREATE TABLE orders (id integer PRIMARY KEY, status text NOT NULL, total numeric(10,2) NOT NULL);
             CREATE TABLE books (id integer PRIMARY KEY, title text NOT NULL, genre text NOT NULL, price numeric(10,2) NOT NULL);
             INSERT INTO books VALUES (1, 'Dune', 'SciFi', 9.99), (2, 'Emma', 'Classic', 5.00), (3, 'Ubik', 'SciFi', 12.00);",
        )
        .await
        .unwrap();
        // Three partitions per source topic, so the two pods share the work.
        let topics: BTreeSet<String> = ["orders", "books"]
            .iter()
            .map(|t| format!("{stem}.public.{t}"))
            .collect();
        create_topics(&topics, 3).await;
        let connector = Connector::start(&stem, &stem, "schema", &[]);

        let routes_yaml = ROUTES.replace("OUT-", &format!("{stem}-"));
        let routes_path = std::env::temp_dir().join(format!("{stem}-routes.yaml"));
        std::fs::write(&routes_path, &routes_yaml).unwrap();
        let db = fresh_db("route_e2e").await;
        let sink = pg(&db).await;
        let routes_file = routes_path.to_str().unwrap().to_string();
        let cfg = config(
            &db,
            &stem,
            &LakeTarget::local("route-e2e"),
            &[
                ("CDC_LAKE__ROUTES__FILE", routes_file.as_str()),
                ("CDC_LAKE__BATCH__MAX_RECORDS", "40"),
                ("CDC_LAKE__LAKE__ENABLED", "false"),
            ],
        );
        let raw = |sql: &'static str| {
            let sink = &sink;
            async move { count(sink, sql).await }
        };

        // Pod A alone: the snapshot (three books), then a first round of streamed changes.
        let pod_a = PodProcess::start(&cfg, 19311);
        wait_until(
            "the snapshot in the raw log (is Debezium running? tools/up --debezium)",
            Duration::from_secs(180),
            || async {
                raw("SELECT count(*) FROM cdc_raw.cdc_events WHERE operation = 'r'").await == 3
            },
        )
        .await;
        traffic(&src, 1).await;
        wait_until(
            "pod A routes the first round",
            Duration::from_secs(180),
            || async {
                raw("SELECT count(*) FROM cdc_raw.cdc_events WHERE operation = 'd'").await >= 9
            },
        )
        .await;

        // Pod B joins the group: a rebalance while traffic flows. Rounds go on until B has
        // consumed changes of its own (its /metrics), so B really took partitions over.
        let pod_b = PodProcess::start(&cfg, 19312);
        let round = std::cell::Cell::new(2);
        wait_until(
            "pod B consumes after the rebalance",
            Duration::from_secs(180),
            || async {
                if pod_b.consumed() > 0 {
                    return true;
                }
                traffic(&src, round.get()).await;
                round.set(round.get() + 1);
                false
            },
        )
        .await;
        let deletes_so_far = i64::from(round.get() - 1) * 9;
        wait_until(
            "B's rounds in the raw log",
            Duration::from_secs(120),
            || async {
                count(
                    &sink,
                    "SELECT count(*) FROM cdc_raw.cdc_events WHERE operation = 'd'",
                )
                .await
                    >= deletes_so_far
            },
        )
        .await;
        // B leaves: the second rebalance hands its partitions back to A.
        pod_b.terminate();

        // A is killed with SIGKILL while a round streams in; C replaces it in a new group under
        // the same checkpoint name (the broker's bookkeeping of the dead member plays no part).
        let (next, after) = (round.get(), round.get() + 1);
        let rounds = tokio::spawn({
            let src = pg(&format!("{}/{stem}", source_base())).await;
            async move {
                traffic(&src, next).await;
                traffic(&src, after).await;
            }
        });
        let streaming = format!(
            "SELECT count(*) FROM cdc_raw.cdc_events WHERE (after_data->>'id')::int BETWEEN {} AND {}",
            next * 100 + 1,
            next * 100 + 60
        );
        wait_until(
            "the next round is streaming",
            Duration::from_secs(120),
            || async { count(&sink, &streaming).await >= 20 },
        )
        .await;
        pod_a.kill_9();
        rounds.await.unwrap();
        let pod_c = PodProcess::start(&after_kill(&cfg), 19313);
        src.batch_execute("INSERT INTO orders VALUES (9999, 'CANCELLED', 1000.00)")
            .await
            .unwrap();
        wait_until(
            "the last change in the raw log",
            Duration::from_secs(180),
            || async {
                raw("SELECT count(*) FROM cdc_raw.cdc_events WHERE after_data->>'id' = '9999'")
                    .await
                    == 1
            },
        )
        .await;
        wait_route_covers_raw_log(&sink).await;
        pod_c.terminate();

        let dup_raw = count(
            &sink,
            "SELECT count(*) FROM (SELECT 1 FROM cdc_raw.cdc_events GROUP BY kafka_topic, kafka_partition, kafka_offset HAVING count(*) > 1) d",
        )
        .await;
        assert_eq!(dup_raw, 0, "the oracle's raw log has no duplicate");
        for (filter, condition) in ORACLE {
            let output = format!("{stem}-{filter}");
            let want = matching(&sink, &stem, condition).await;
            assert!(!want.is_empty(), "{filter}: the traffic has matches");
            let got = read_routed(&output);
            let twice = routed_twice(&got);
            assert!(twice.is_empty(), "{filter}: routed twice: {twice:?}");
            let got_set: BTreeSet<(String, i32, i64)> = got.keys().cloned().collect();
            let missing: Vec<_> = want.difference(&got_set).collect();
            let extra: Vec<_> = got_set.difference(&want).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{filter}: missing {missing:?}, not matching {extra:?}"
            );
            let by_filter: BTreeMap<String, usize> =
                got.values().fold(BTreeMap::new(), |mut m, v| {
                    *m.entry(
                        v[0]["filterMetadata"]["filterId"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                    )
                    .or_default() += 1;
                    m
                });
            assert_eq!(by_filter.keys().collect::<Vec<_>>(), vec![filter]);
        }
        // Its replication slot would hold WAL and one of the source's ten slots.
        drop(connector);
        drop_source_db(&stem).await;
    });
}
