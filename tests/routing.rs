//! The route sink against the real broker and PostgreSQL: the sink contract (the conformance
//! suite), and no duplicate after a crash between the produce and the checkpoint's commit. The
//! oracle is an independent read of the output topic, compared with the source records.

mod common;

use std::sync::Arc;

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

#[test]
fn a_crash_between_produce_and_commit_routes_nothing_twice() {
    run_test(async {
        let db = sink_db("route_crash").await;
        let client = pg(&db).await;
        let source = unique("orders").replace('_', "-");
        let output = unique("filtered-cancellations").replace('_', "-");
        let routes = routes(&cancellations(&output));
        let tp = TopicPartition::new(&source, 0);

        let mut sink = route_sink(&routes, &db, "crash").await;
        sink.checkpoints(std::slice::from_ref(&tp)).await.unwrap();
        sink.write(&orders(&source, 0, 0..150)).await.unwrap();

        // The next batch's records reach the broker, then its commit fails (a trigger on the
        // progress table raises): the crash the checkpoint does not cover.
        client
            .batch_execute(
                "CREATE FUNCTION pg_temp_crash() RETURNS trigger LANGUAGE plpgsql AS
                   $$ BEGIN RAISE EXCEPTION 'simulated crash before the commit'; END $$;
                 CREATE TRIGGER crash BEFORE UPDATE ON cdc_lake.route_progress
                   FOR EACH ROW EXECUTE FUNCTION pg_temp_crash();",
            )
            .await
            .unwrap();
        let failed = sink.write(&orders(&source, 0, 150..300)).await;
        assert!(failed.is_err(), "the commit was made to fail");
        let before_retry = read_routed(&output);
        let stranded = before_retry.keys().filter(|(_, _, o)| *o >= 150).count();
        assert_eq!(stranded, 50, "the failed batch's records are in the output");
        client
            .batch_execute("DROP TRIGGER crash ON cdc_lake.route_progress")
            .await
            .unwrap();

        // A new owner (a restarted pod) and the same one retrying both redeliver the batch.
        let mut restarted = route_sink(&routes, &db, "crash").await;
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

        let got = read_routed(&output);
        let duplicated: Vec<_> = got
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(k, _)| k)
            .collect();
        assert!(duplicated.is_empty(), "routed twice: {duplicated:?}");
        let got_keys: Vec<(String, i32, i64)> = got.keys().cloned().collect();
        assert_eq!(got_keys, expected(&source, 0, 0..330));
        for values in got.values() {
            assert_eq!(
                values[0]["filterMetadata"]["filterId"],
                "cancelled-over-100"
            );
            assert_eq!(values[0]["after"]["status"], "CANCELLED");
        }
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
