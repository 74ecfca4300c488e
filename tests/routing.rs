//! The route sink against the real broker and PostgreSQL: the sink contract (the conformance
//! suite), and no duplicate after a crash between the produce and the checkpoint's commit. The
//! oracle is an independent read of the output topic, compared with the source records.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cdc_lake::batch::Batch;
use cdc_lake::domain::{KafkaCoordinates, TopicPartition};
use cdc_lake::envelope::Decoder;
use cdc_lake::route::Routes;
use cdc_lake::sink::route::RouteSink;
use cdc_lake::sink::Sink;
use common::*;

/// Changes to `topic`/`partition` at `offsets`: status `CANCELLED` on every third, and a total
/// of `offset` dollars and 10 cents.
fn orders(topic: &str, partition: i32, offsets: std::ops::Range<i64>) -> Batch {
    let mut decoder = Decoder::new();
    let mut b = Batch::default();
    for o in offsets {
        let status = if o % 3 == 0 { "CANCELLED" } else { "SHIPPED" };
        let value = format!(
            r#"{{"before":null,"after":{{"id":{o},"status":"{status}","total":{o}.10}},"source":{{"db":"ecomdb","schema":"public","table":"orders","ts_ms":1700000000000,"lsn":{l}}},"op":"c","ts_ms":1}}"#,
            l = 1000 + o
        );
        b.records.push(decoder.decode(
            KafkaCoordinates {
                topic: topic.into(),
                partition,
                offset: o,
                timestamp_ms: Some(1_700_000_000_000),
            },
            Some(format!(r#"{{"id":{o}}}"#).as_bytes()),
            Some(value.as_bytes()),
        ));
    }
    b
}

fn routes(yaml: &str) -> Arc<Routes> {
    Arc::new(Routes::parse("routes.yaml", yaml).unwrap())
}

/// A fresh sink database with the migrations applied.
async fn sink_db(name: &str) -> String {
    let db = fresh_db(name).await;
    cdc_lake::db::migrate(&mut pg(&db).await).await.unwrap();
    db
}

async fn route_sink(routes: &Arc<Routes>, db: &str, consumer: &str) -> RouteSink {
    let cfg = config(db, "unused", &LakeTarget::local("route"), &[]);
    RouteSink::new(
        routes.clone(),
        &cfg.kafka,
        &cfg.routes,
        cfg.postgres.clone(),
        consumer,
    )
    .unwrap()
}

/// The filter of these tests: cancelled orders above 100.00, as the envelope.
fn cancellations(output: &str) -> String {
    format!(
        "filters:
  - id: cancelled-over-100
    consumer: finance
    tables: [public.orders]
    when:
      and:
        - {{field: after.status, equals: CANCELLED}}
        - {{field: after.total, greaterThan: 100.00}}
    topic: {output}
"
    )
}

/// What the filter must route from `offsets`: computed from the test's own rule, not the code.
fn expected(topic: &str, partition: i32, offsets: std::ops::Range<i64>) -> Vec<(String, i32, i64)> {
    offsets
        .filter(|o| o % 3 == 0 && *o >= 100)
        .map(|o| (topic.to_string(), partition, o))
        .collect()
}

/// From here on, the route sink's commit fails after its records reached the broker (a trigger
/// on the progress table raises): the crash between produce and commit.
async fn fail_route_commits(client: &tokio_postgres::Client) {
    client
        .batch_execute(
            "CREATE FUNCTION pg_temp_crash() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'simulated crash before the commit'; END $$;
             CREATE TRIGGER crash BEFORE UPDATE ON cdc_lake.route_progress
               FOR EACH ROW EXECUTE FUNCTION pg_temp_crash();",
        )
        .await
        .unwrap();
}

async fn allow_route_commits(client: &tokio_postgres::Client) {
    client
        .batch_execute("DROP TRIGGER crash ON cdc_lake.route_progress")
        .await
        .unwrap();
}

/// The output read back (an independent consumer), after checking that it holds each change
/// of `want` exactly once and nothing else.
fn routed_once_each(
    output: &str,
    want: Vec<(String, i32, i64)>,
) -> std::collections::BTreeMap<(String, i32, i64), Vec<serde_json::Value>> {
    let got = read_routed(output);
    let twice = routed_twice(&got);
    assert!(twice.is_empty(), "routed twice: {twice:?}");
    let got_keys: Vec<(String, i32, i64)> = got.keys().cloned().collect();
    assert_eq!(got_keys, want);
    got
}

/// A route sink that routed changes 0..150 of partition 0 of a new source topic, then crashed
/// on 150..300 between the produce and the commit: its 50 matches are in the output, the
/// checkpoint does not cover them.
struct CrashedBatch {
    db: String,
    source: String,
    output: String,
    routes: Arc<Routes>,
    tp: TopicPartition,
    sink: RouteSink,
}

async fn crash_a_batch(name: &str, output: &str) -> CrashedBatch {
    let db = sink_db(name).await;
    let client = pg(&db).await;
    let source = unique("orders").replace('_', "-");
    let output = unique(output).replace('_', "-");
    let routes = routes(&cancellations(&output));
    let tp = TopicPartition::new(&source, 0);

    let mut sink = route_sink(&routes, &db, name).await;
    sink.checkpoints(std::slice::from_ref(&tp)).await.unwrap();
    sink.write(&orders(&source, 0, 0..150)).await.unwrap();

    // The next batch's records reach the broker, then its commit fails (a trigger on the
    // progress table raises): the crash the checkpoint does not cover.
    fail_route_commits(&client).await;
    let failed = sink.write(&orders(&source, 0, 150..300)).await;
    assert!(failed.is_err(), "the commit was made to fail");
    let stranded = read_routed(&output)
        .keys()
        .filter(|(_, _, o)| *o >= 150)
        .count();
    assert_eq!(stranded, 50, "the failed batch's records are in the output");
    allow_route_commits(&client).await;
    CrashedBatch {
        db,
        source,
        output,
        routes,
        tp,
        sink,
    }
}

#[test]
fn a_crash_between_produce_and_commit_routes_nothing_twice() {
    run_test(async {
        let CrashedBatch {
            db,
            source,
            output,
            routes,
            tp,
            mut sink,
        } = crash_a_batch("route_crash", "filtered-cancellations").await;

        // A new owner (a restarted pod) and the same one retrying both redeliver the batch.
        let mut restarted = route_sink(&routes, &db, "route_crash").await;
        restarted
            .checkpoints(std::slice::from_ref(&tp))
            .await
            .unwrap();
        let ack = restarted
            .write(&orders(&source, 0, 150..300))
            .await
            .unwrap();
        assert_eq!(ack.durable[&tp], 300);
        sink.write(&orders(&source, 0, 150..300)).await.unwrap();
        restarted
            .write(&orders(&source, 0, 300..330))
            .await
            .unwrap();

        let got = routed_once_each(&output, expected(&source, 0, 0..330));
        for values in got.values() {
            assert_eq!(
                values[0]["filterMetadata"]["filterId"],
                "cancelled-over-100"
            );
            assert_eq!(values[0]["after"]["status"], "CANCELLED");
        }
    });
}

/// A restarted pod takes up a crashed batch in smaller batches than the crashed one (its batch
/// boundaries need not be the same): what the crashed batch left in the output past the first
/// of them is not routed again by the later ones, which no longer look unsure (found by the
/// suite's routing_debezium test: one change routed twice after a SIGKILL).
#[test]
fn a_successor_taking_up_a_crashed_batch_in_smaller_batches_routes_nothing_twice() {
    run_test(async {
        let CrashedBatch {
            db,
            source,
            output,
            routes,
            tp,
            ..
        } = crash_a_batch("route_split", "split-cancellations").await;

        let mut restarted = route_sink(&routes, &db, "route_split").await;
        restarted
            .checkpoints(std::slice::from_ref(&tp))
            .await
            .unwrap();
        for offsets in [150..200, 200..260, 260..330] {
            restarted.write(&orders(&source, 0, offsets)).await.unwrap();
        }

        routed_once_each(&output, expected(&source, 0, 0..330));
    });
}

/// The old owner of a partition has not noticed the rebalance (no revoke reached it), and its
/// successor crashed after producing a batch, before the commit: the checkpoint is where the
/// old owner left it, so only the successor's counted attempt tells it to read the output first.
#[test]
fn a_stale_owner_after_its_successors_crash_routes_nothing_twice() {
    run_test(async {
        let db = sink_db("route_stale").await;
        let client = pg(&db).await;
        let source = unique("orders").replace('_', "-");
        let output = unique("filtered-cancellations").replace('_', "-");
        let routes = routes(&cancellations(&output));
        let tp = TopicPartition::new(&source, 0);

        let mut old = route_sink(&routes, &db, "stale").await;
        old.checkpoints(std::slice::from_ref(&tp)).await.unwrap();
        old.write(&orders(&source, 0, 0..150)).await.unwrap();

        let mut successor = route_sink(&routes, &db, "stale").await;
        successor
            .checkpoints(std::slice::from_ref(&tp))
            .await
            .unwrap();
        fail_route_commits(&client).await;
        let crashed = successor.write(&orders(&source, 0, 150..300)).await;
        assert!(crashed.is_err(), "the successor's commit was made to fail");
        drop(successor);
        allow_route_commits(&client).await;
        let stranded = read_routed(&output)
            .keys()
            .filter(|(_, _, o)| *o >= 150)
            .count();
        assert_eq!(stranded, 50, "the successor's records are in the output");

        // The old owner goes on where it left off, as if nothing happened.
        old.write(&orders(&source, 0, 150..300)).await.unwrap();
        routed_once_each(&output, expected(&source, 0, 0..300));
    });
}

#[test]
fn two_writers_of_one_partition_route_each_change_once() {
    run_test(async {
        let db = sink_db("route_fence").await;
        let source = unique("orders").replace('_', "-");
        let output = unique("filtered-cancellations").replace('_', "-");
        let routes = routes(&cancellations(&output));
        let tp = TopicPartition::new(&source, 0);
        // The old owner has not noticed the rebalance; both write the same range at once
        // (the zombie the dev broker's transactions would not fence).
        let mut old = route_sink(&routes, &db, "fence").await;
        let mut new = route_sink(&routes, &db, "fence").await;
        old.checkpoints(std::slice::from_ref(&tp)).await.unwrap();
        new.checkpoints(std::slice::from_ref(&tp)).await.unwrap();
        let (a, b) = (orders(&source, 0, 0..400), orders(&source, 0, 0..400));
        let (ra, rb) = tokio::join!(old.write(&a), new.write(&b));
        ra.unwrap();
        rb.unwrap();
        old.write(&orders(&source, 0, 200..500)).await.unwrap();
        let got = read_routed(&output);
        assert!(
            got.values().all(|v| v.len() == 1),
            "a change was routed twice"
        );
        let got_keys: Vec<(String, i32, i64)> = got.keys().cloned().collect();
        assert_eq!(got_keys, expected(&source, 0, 0..500));
    });
}

#[test]
fn a_missing_output_topic_is_an_error_when_configured() {
    run_test(async {
        let db = fresh_db("route_missing").await;
        let output = unique("not-created").replace('_', "-");
        let routes = routes(&cancellations(&output));
        let mut cfg = config(&db, "unused", &LakeTarget::local("route"), &[]);
        cfg.routes.missing_topic = cdc_lake::config::MissingTopic::Error;
        let mut sink =
            RouteSink::new(routes, &cfg.kafka, &cfg.routes, cfg.postgres.clone(), "m").unwrap();
        let err = sink
            .checkpoints(&[TopicPartition::new(unique("src"), 0)])
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&output), "{err}");
        assert_eq!(err.class(), cdc_lake::sink::ErrorClass::Fatal);
    });
}

/// A filter added to a running deployment gets its history from the raw log (`cdc-replay
/// --target route:<id>`, run while the pod routes live, and run twice), and its live changes
/// from the pod: together every matching change once.
#[test]
fn backfill_and_the_live_route_give_a_new_filter_each_change_once() {
    run_test(async {
        let prefix = unique("bkf").replace('_', "-");
        let (records, _) = order_stream(&prefix, 300);
        let topics: std::collections::BTreeSet<String> =
            records.iter().map(|r| r.topic.clone()).collect();
        create_topics(&topics, 4).await;
        let (first, rest) = records.split_at(400);
        produce(first).await;

        let db = sink_db("route_backfill").await;
        let sink = pg(&db).await;
        let confirmed = format!("{prefix}-confirmed");
        let shipped = format!("{prefix}-shipped-or-gone");
        let one = format!(
            "filters:\n  - id: confirmed\n    consumer: a\n    topic: {confirmed}\n    when: {{field: after.status, equals: CONFIRMED}}\n"
        );
        let two = format!(
            "{one}  - id: shipped-or-gone\n    consumer: b\n    topic: {shipped}\n    output: after\n    when: {{or: [{{field: after.status, equals: SHIPPED}}, {{field: op, equals: d}}]}}\n"
        );
        let routes_path = std::env::temp_dir().join(format!("{prefix}-routes.yaml"));
        std::fs::write(&routes_path, &one).unwrap();
        let routes_file = routes_path.to_str().unwrap().to_string();
        let cfg = config(
            &db,
            &prefix,
            &LakeTarget::local("route-backfill"),
            &[
                ("CDC_LAKE__ROUTES__FILE", routes_file.as_str()),
                ("CDC_LAKE__BATCH__MAX_RECORDS", "50"),
            ],
        );
        let routed_all = |n: usize| {
            let sink = &sink;
            async move {
                count(sink, "SELECT count(*) FROM cdc_raw.cdc_events").await == n as i64
                    && count(
                        sink,
                        "SELECT count(*) FROM cdc_raw.cdc_events e WHERE NOT EXISTS (
                            SELECT 1 FROM cdc_lake.checkpoints c WHERE c.sink = 'route'
                               AND c.kafka_topic = e.kafka_topic AND c.kafka_partition = e.kafka_partition
                               AND c.next_offset > e.kafka_offset)",
                    )
                    .await
                        == 0
            }
        };
        let pod = Pod::start(cfg.clone());
        wait_until("the first part routed", Duration::from_secs(90), || {
            routed_all(first.len())
        })
        .await;
        pod.stop().await;

        // The new filter, live from the route's checkpoint on; the rest of the stream arrives.
        std::fs::write(&routes_path, &two).unwrap();
        let pod = Pod::start(cfg.clone());
        produce(rest).await;
        // The backfill runs while the pod routes the new changes, then once more.
        let config_path = std::env::temp_dir().join(format!("{prefix}.toml"));
        std::fs::write(&config_path, toml::to_string(&cfg).unwrap()).unwrap();
        let backfill = || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdc-replay"));
            cmd.args([
                "--config",
                config_path.to_str().unwrap(),
                "--target",
                "route:shipped-or-gone",
                "--from-offset",
                "0",
            ]);
            let out = output_within(cmd, Duration::from_secs(120));
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
        };
        let first_run = backfill();
        assert!(
            first_run.contains(" routed") && !first_run.contains(" 0 routed"),
            "the first backfill routes the history: {first_run}"
        );
        wait_until("the whole stream routed", Duration::from_secs(90), || {
            routed_all(records.len())
        })
        .await;
        let second_run = backfill();
        assert!(
            second_run.contains(" 0 routed"),
            "a second backfill routes nothing: {second_run}"
        );
        pod.stop().await;

        for (topic, condition) in [
            (&confirmed, "after_data->>'status' = 'CONFIRMED'"),
            (
                &shipped,
                "after_data->>'status' = 'SHIPPED' OR operation = 'd'",
            ),
        ] {
            let want: Vec<(String, i32, i64)> = sink
                .query(
                    &format!(
                        "SELECT kafka_topic, kafka_partition, kafka_offset FROM cdc_raw.cdc_events
                          WHERE {condition} ORDER BY 1, 2, 3"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            let got = read_routed(topic);
            assert!(
                got.values().all(|v| v.len() == 1),
                "{topic}: a change routed twice"
            );
            let got: Vec<(String, i32, i64)> = got.keys().cloned().collect();
            assert!(!want.is_empty());
            assert_eq!(got, want, "{topic}");
        }
    });
}
