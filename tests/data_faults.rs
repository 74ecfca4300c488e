//! Data faults (issue "Data faults"): no single record stops a sink, and no checkpoint passes a
//! record that is neither stored nor rejected. Each test runs the pod against real PostgreSQL,
//! the broker and the lake, and checks every sink against the records it produced.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use cdc_lake::telemetry::METRICS;
use common::*;
use rdkafka::producer::FutureRecord;
use tokio_postgres::Client;

/// One schemaless Debezium envelope for `table` (schema `public` unless the name has a dot).
fn envelope(table: &str, after: &str, lsn: i64, ts_ms: i64) -> String {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let schema = serde_json::to_string(schema).unwrap();
    let name = serde_json::to_string(name).unwrap();
    format!(
        r#"{{"before":null,"after":{after},"source":{{"version":"3.6.3.Final","connector":"postgresql","name":"df","ts_ms":{ts_ms},"snapshot":"false","db":"ecomdb","sequence":"[\"{lsn}\",\"{lsn}\"]","schema":{schema},"table":{name},"txId":1,"lsn":{lsn}}},"op":"c","ts_ms":{ts_ms}}}"#
    )
}

/// A record to produce: key, value and, when set, the Kafka timestamp.
struct Rec {
    key: String,
    value: String,
    timestamp: Option<i64>,
}

fn rec(table: &str, key: &str, after: &str, lsn: i64) -> Rec {
    Rec {
        key: key.into(),
        value: envelope(table, after, lsn, 1_795_239_028_962),
        timestamp: None,
    }
}

/// Produces the records in order to partition 0 of `topic`; returns their offsets.
async fn produce_to(topic: &str, records: &[Rec]) -> Vec<i64> {
    create_topics(&BTreeSet::from([topic.to_string()]), 1).await;
    let p = producer();
    let mut out = Vec::new();
    for r in records {
        let mut fr = FutureRecord::to(topic)
            .partition(0)
            .key(&r.key)
            .payload(&r.value);
        if let Some(ts) = r.timestamp {
            fr = fr.timestamp(ts);
        }
        let (partition, offset) = p
            .send(fr, Duration::from_secs(10))
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| e)
            .unwrap();
        assert_eq!(partition, 0);
        out.push(offset);
    }
    out
}

/// Text nothing compresses well: a key this long cannot be indexed (btree rows stop at 2704).
fn incompressible(len: usize) -> String {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// The state sink's rejects of `topic`: (offset, reason), in offset order.
async fn state_rejects(client: &Client, topic: &str) -> Vec<(i64, String)> {
    pairs(
        client,
        "SELECT kafka_offset, reason FROM cdc_raw.cdc_rejects
          WHERE kafka_topic = $1 AND stage = 'state' ORDER BY 1",
        &[&topic],
    )
    .await
}

async fn offsets(client: &Client, sql: &str, topic: &str) -> Vec<i64> {
    client
        .query(sql, &[&topic])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn checkpoint(client: &Client, sink: &str, topic: &str) -> Option<i64> {
    client
        .query_opt(
            "SELECT next_offset FROM cdc_lake.checkpoints WHERE sink = $1 AND kafka_topic = $2",
            &[&sink, &topic],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Waits until the raw log's and the mirror's checkpoints of `topic` both reach `next`.
async fn wait_for_raw_and_state(
    client: &Client,
    topic: &str,
    next: i64,
    what: &str,
    timeout: Duration,
) {
    wait_until(what, timeout, || async {
        checkpoint(client, "raw", topic).await == Some(next)
            && checkpoint(client, "state", topic).await == Some(next)
    })
    .await;
}

/// Records this test's topic has delivered to the pod (the pod's own counter).
fn consumed(topic: &str) -> u64 {
    METRICS.consumed.with_label_values(&[topic]).get()
}

/// Which sink a wedge holds.
#[derive(Clone, Copy)]
enum Wedged {
    Raw,
    State,
}

/// The reproduction from the issue: a sink fails deterministically on a batch (here a trigger
/// that raises a serialization failure, which is retried forever), more records arrive, and the
/// pod gets SIGTERM. The wedged sink's checkpoint must stay where its data ends, the pod must
/// exit with an error naming it, and after a restart (the fault fixed) every record arrives.
async fn sigterm_during_a_wedge(which: Wedged) {
    let prefix = unique("wedge").replace('_', "-");
    let topic = format!("{prefix}.public.good");
    let db = fresh_db("wedge").await;
    let lake = LakeTarget::local("wedge");
    let cfg = config(&db, &prefix, &lake, &[("CDC_LAKE__BATCH__MAX_AGE", "50ms")]);
    cdc_lake::ingest::migrate(&cfg).await.unwrap();
    let client = pg(&db).await;
    // The wedge: every attempt bumps a sequence (outside the transaction, so the test can see
    // the pod retrying) and fails with SQLSTATE 40001.
    // It holds one record's batch only (the raw row of table wcol; the mirror of wcol, made
    // ahead as the pod would make it), so that a later batch would succeed: the case where a
    // checkpoint used to jump over the failed batch.
    let (table, when) = match which {
        Wedged::Raw => ("cdc_raw.cdc_events", "NEW.source_table = 'public.wcol'"),
        Wedged::State => ("cdc_processed.wcol", "true"),
    };
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS cdc_processed;
             CREATE TABLE cdc_processed.wcol (id bigint NOT NULL, w_lsn bigint, w_commit_lsn bigint,
                v text, cdc_operation text NOT NULL, cdc_commit_lsn bigint NOT NULL,
                cdc_lsn bigint NOT NULL, cdc_source_ts timestamptz,
                cdc_kafka_partition integer NOT NULL, cdc_kafka_offset bigint NOT NULL,
                cdc_synced_at timestamptz NOT NULL DEFAULT now(),
                cdc_deleted boolean NOT NULL DEFAULT false, PRIMARY KEY (id));",
        )
        .await
        .unwrap();
    client
        .batch_execute(&format!(
            "CREATE SEQUENCE wedge_hits;
             CREATE FUNCTION wedge() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM nextval('wedge_hits');
                   RAISE EXCEPTION 'wedged by the test' USING ERRCODE = '40001'; END $$;
             CREATE TRIGGER wedge BEFORE INSERT OR UPDATE ON {table}
                FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION wedge();"
        ))
        .await
        .unwrap();

    let first = vec![
        rec("good", r#"{"id":1}"#, r#"{"id":1,"v":"a"}"#, 100),
        // The issue's record: its columns collide with the old MERGE's internal aliases.
        rec(
            "wcol",
            r#"{"id":1}"#,
            r#"{"id":1,"w_lsn":5,"w_commit_lsn":6,"v":"x"}"#,
            200,
        ),
        rec("good", r#"{"id":2}"#, r#"{"id":2,"v":"b"}"#, 300),
    ];
    // Every record of the test goes to one topic (the table names differ), so order is total.
    produce_to(&topic, &first).await;
    let pod = Pod::start(cfg.clone());
    wait_until(
        "the pod to retry the wedged sink",
        Duration::from_secs(60),
        || async { count(&client, "SELECT last_value FROM wedge_hits WHERE is_called").await >= 2 },
    )
    .await;
    produce_to(
        &topic,
        &[rec("good", r#"{"id":3}"#, r#"{"id":3,"v":"c"}"#, 400)],
    )
    .await;
    wait_until(
        "the pod to receive the record after the wedge",
        Duration::from_secs(30),
        || async { consumed(&topic) >= 4 },
    )
    .await;
    let outcome = pod.stop_result().await;
    let err = outcome.expect_err("a pod stopped with a failing sink exits with an error");
    let sink = match which {
        Wedged::Raw => "raw",
        Wedged::State => "state",
    };
    assert!(
        err.to_string().contains(sink) && err.to_string().contains(&topic),
        "the error names the sink and partition: {err}"
    );
    let held = checkpoint(&client, sink, &topic).await.unwrap_or(0);
    assert_eq!(
        held, 0,
        "{sink}: the checkpoint stays before the records it never stored"
    );
    let raw_now = offsets(
        &client,
        "SELECT kafka_offset FROM cdc_raw.cdc_events WHERE kafka_topic = $1 ORDER BY 1",
        &topic,
    )
    .await;
    match which {
        Wedged::Raw => assert!(raw_now.is_empty(), "nothing past the gap: {raw_now:?}"),
        Wedged::State => assert_eq!(raw_now, vec![0, 1, 2, 3], "raw was healthy"),
    }

    // Fixed: the pod resumes the wedged sink from its checkpoint.
    client
        .batch_execute(&format!("DROP TRIGGER wedge ON {table}"))
        .await
        .unwrap();
    let pod = Pod::start(cfg.clone());
    wait_for_raw_and_state(
        &client,
        &topic,
        4,
        "every sink past the last record",
        Duration::from_secs(60),
    )
    .await;
    pod.stop().await;
    let raw = offsets(
        &client,
        "SELECT kafka_offset FROM cdc_raw.cdc_events WHERE kafka_topic = $1 ORDER BY 1",
        &topic,
    )
    .await;
    assert_eq!(raw, vec![0, 1, 2, 3], "every record in the raw log once");
    let good = offsets(
        &client,
        "SELECT cdc_kafka_offset FROM cdc_processed.good WHERE $1 <> '' ORDER BY 1",
        &topic,
    )
    .await;
    assert_eq!(good, vec![0, 2, 3], "every good row in the mirror");
    let w: (i64, i64) = client
        .query_one(
            "SELECT w_lsn::bigint, w_commit_lsn::bigint FROM cdc_processed.wcol",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        w,
        (5, 6),
        "columns named like internal aliases are mirrored"
    );
    let rejects = count(&client, "SELECT count(*) FROM cdc_raw.cdc_rejects").await;
    assert_eq!(rejects, 0, "nothing here is bad data");
}

#[test]
fn sigterm_while_the_raw_log_is_wedged_loses_nothing() {
    run_test(async {
        sigterm_during_a_wedge(Wedged::Raw).await;
    });
}

#[test]
fn sigterm_while_the_state_sink_is_wedged_loses_nothing() {
    run_test(async {
        sigterm_during_a_wedge(Wedged::State).await;
    });
}

/// Every single-record case from the issue, interleaved with good records on one partition.
/// Each sink stores each record or rejects it at its own stage with a reason; good records
/// behind the poison ones arrive; nothing is stored twice.
#[test]
fn single_poison_records_are_isolated_per_sink() {
    run_test(async {
        let prefix = unique("poison").replace('_', "-");
        let topic = format!("{prefix}.public.mixed");
        let wide_after = format!(
            "{{\"id\":1,{}}}",
            (0..2000)
                .map(|i| format!("\"c{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let big_key = incompressible(3000);
        let long_col = "x".repeat(64);
        let mut out_of_range_source = rec("oldsrc", r#"{"id":1}"#, r#"{"id":1}"#, 900);
        out_of_range_source.value = envelope("oldsrc", r#"{"id":1}"#, 900, -250_000_000_000_000);
        let mut old_kafka_ts = rec("oldkafka", r#"{"id":1}"#, r#"{"id":1}"#, 950);
        old_kafka_ts.timestamp = Some(-250_000_000_000_000);
        // (record, rejected by raw, rejected by state)
        let cases: Vec<(Rec, bool, bool)> = vec![
            (
                rec("good", r#"{"id":1}"#, r#"{"id":1,"v":"a"}"#, 100),
                false,
                false,
            ),
            (
                rec(
                    "wcol",
                    r#"{"id":1}"#,
                    r#"{"id":1,"w_lsn":5,"w_commit_lsn":6}"#,
                    110,
                ),
                false,
                false,
            ),
            (
                rec("metakey", r#"{"cdc_operation":"k"}"#, r#"{"id":1}"#, 120),
                false,
                true,
            ),
            (
                rec("widen", r#"{"id":1}"#, r#"{"id":1,"t":"a"}"#, 130),
                false,
                false,
            ),
            (
                rec("widen", r#"{"id":1,"t":"a"}"#, r#"{"id":1,"t":"a"}"#, 140),
                false,
                true,
            ),
            (
                rec("widen", r#"{"id":1,"t":"b"}"#, r#"{"id":1,"t":"b"}"#, 150),
                false,
                true,
            ),
            (rec("wide", r#"{"id":1}"#, &wide_after, 160), false, true),
            (
                rec(
                    "bigkey",
                    &format!(r#"{{"k":"{big_key}"}}"#),
                    &format!(r#"{{"k":"{big_key}"}}"#),
                    170,
                ),
                false,
                true,
            ),
            (
                rec("nul", r#"{"id":1}"#, r#"{"id":1,"v":"a\u0000b"}"#, 180),
                true,
                true,
            ),
            (
                rec("nul\u{0}table", r#"{"id":1}"#, r#"{"id":1}"#, 190),
                true,
                true,
            ),
            (out_of_range_source, false, false),
            (old_kafka_ts, true, false),
            // One bad column name in one row; the clean rows of its table in the same batch apply.
            (
                rec("longcol", r#"{"id":1}"#, r#"{"id":1,"v":1}"#, 200),
                false,
                false,
            ),
            (
                rec(
                    "longcol",
                    r#"{"id":2}"#,
                    &format!(r#"{{"id":2,"{long_col}":1}}"#),
                    210,
                ),
                false,
                true,
            ),
            (
                rec("longcol", r#"{"id":3}"#, r#"{"id":3,"v":3}"#, 220),
                false,
                false,
            ),
            // Lake-unsafe names.
            (rec("..", r#"{"id":1}"#, r#"{"id":1}"#, 230), false, false),
            (rec("a/b", r#"{"id":1}"#, r#"{"id":1}"#, 240), false, false),
            (rec("x=y", r#"{"id":1}"#, r#"{"id":1}"#, 250), false, false),
            (
                rec("good", r#"{"id":2}"#, r#"{"id":2,"v":"b"}"#, 260),
                false,
                false,
            ),
        ];
        let records: Vec<Rec> = cases
            .iter()
            .map(|(r, ..)| Rec {
                key: r.key.clone(),
                value: r.value.clone(),
                timestamp: r.timestamp,
            })
            .collect();
        let produced = produce_to(&topic, &records).await;
        let last = *produced.last().unwrap();
        let expect = |pick: fn(&(Rec, bool, bool)) -> bool| -> Vec<i64> {
            cases
                .iter()
                .zip(&produced)
                .filter(|(c, _)| pick(c))
                .map(|(_, o)| *o)
                .collect()
        };
        let raw_rejected = expect(|c| c.1);
        let state_rejected = expect(|c| c.2);

        let db = fresh_db("poison").await;
        let lake = LakeTarget::local("poison");
        let cfg = config(&db, &prefix, &lake, &[]);
        cdc_lake::ingest::migrate(&cfg).await.unwrap();
        let pod = Pod::start(cfg);
        let client = pg(&db).await;
        // Healthy records behind every poison one arrive, in every sink.
        wait_for_raw_and_state(
            &client,
            &topic,
            last + 1,
            "every sink past the last record",
            Duration::from_secs(90),
        )
        .await;
        pod.stop().await;

        // Raw: every record once, stored or rejected at stage raw with its exact bytes.
        let stored = offsets(
            &client,
            "SELECT kafka_offset FROM cdc_raw.cdc_events WHERE kafka_topic = $1 ORDER BY 1",
            &topic,
        )
        .await;
        let rejected_raw = offsets(
            &client,
            "SELECT kafka_offset FROM cdc_raw.cdc_rejects WHERE kafka_topic = $1 AND stage = 'raw' ORDER BY 1",
            &topic,
        )
        .await;
        assert_eq!(rejected_raw, raw_rejected, "raw rejects");
        let mut all: Vec<i64> = stored.iter().chain(&rejected_raw).copied().collect();
        all.sort_unstable();
        assert_eq!(all, produced, "raw: each record stored or rejected, once");
        for row in client
            .query(
                "SELECT kafka_offset, raw_value, reason FROM cdc_raw.cdc_rejects WHERE kafka_topic = $1 AND stage = 'raw'",
                &[&topic],
            )
            .await
            .unwrap()
        {
            let offset: i64 = row.get(0);
            let i = produced.iter().position(|o| *o == offset).unwrap();
            assert_eq!(
                row.get::<_, Vec<u8>>(1),
                cases[i].0.value.as_bytes(),
                "exact bytes kept"
            );
            let reason: String = row.get(2);
            assert!(reason.contains("raw log cannot store"), "{reason}");
        }
        let old: Option<chrono::DateTime<chrono::Utc>> = client
            .query_one(
                "SELECT event_timestamp FROM cdc_raw.cdc_events WHERE source_table = 'public.oldsrc'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(old, None, "an out-of-range source time reads NULL");

        // State: the rejects are exactly the records no mirror can take, each with a reason that
        // names its table; the rest are in their mirrors.
        let rejected_state = state_rejects(&client, &topic).await;
        assert_eq!(
            rejected_state.iter().map(|r| r.0).collect::<Vec<_>>(),
            state_rejected,
            "state rejects: {rejected_state:#?}"
        );
        for (offset, reason) in &rejected_state {
            assert!(
                reason.contains("cannot apply to") || reason.contains("cannot be mirrored"),
                "offset {offset}: {reason}"
            );
            assert!(
                !reason.contains(&big_key[..40]) && !reason.contains("a\u{0}b"),
                "no row values in reasons: {reason}"
            );
        }
        let widen = &rejected_state
            .iter()
            .find(|r| r.0 == produced[4])
            .unwrap()
            .1;
        assert!(widen.contains("primary key"), "{widen}");
        let longcol = offsets(
            &client,
            "SELECT cdc_kafka_offset FROM cdc_processed.longcol WHERE $1 <> '' ORDER BY 1",
            &topic,
        )
        .await;
        assert_eq!(
            longcol,
            vec![produced[12], produced[14]],
            "clean rows apply"
        );
        let good = offsets(
            &client,
            "SELECT cdc_kafka_offset FROM cdc_processed.good WHERE $1 <> '' ORDER BY 1",
            &topic,
        )
        .await;
        assert_eq!(good, vec![produced[0], produced[18]]);
        let w: i64 = client
            .query_one("SELECT w_lsn::bigint FROM cdc_processed.wcol", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(w, 5);

        // Lake: every change, exactly once, whatever its table is called.
        let report = lake.check();
        assert_eq!(report["duplicates"], 0, "{report}");
        assert_eq!(report["unlisted"].as_array().unwrap().len(), 0, "{report}");
        let in_lake: Vec<i64> = lake_coords(&report).into_iter().map(|c| c.2).collect();
        assert_eq!(in_lake, produced, "every change in the lake");
    });
}

/// `prune-raw` deletes a raw row only when a committed lake file holds it. Tables with names
/// that are unsafe as paths used to be skipped by the lake inside a committed manifest range,
/// and prune then deleted them from the raw log too.
#[test]
fn prune_after_lake_unsafe_names_keeps_every_change_somewhere() {
    run_test(async {
        let prefix = unique("prune").replace('_', "-");
        let topic = format!("{prefix}.public.mixed");
        let records = vec![
            rec("good", r#"{"id":1}"#, r#"{"id":1}"#, 100),
            rec("..", r#"{"id":1}"#, r#"{"id":1}"#, 110),
            rec("a/b", r#"{"id":1}"#, r#"{"id":1}"#, 120),
            rec("x=y", r#"{"id":1}"#, r#"{"id":1}"#, 130),
            rec("good", r#"{"id":2}"#, r#"{"id":2}"#, 140),
        ];
        let produced = produce_to(&topic, &records).await;
        let db = fresh_db("prune").await;
        let lake = LakeTarget::local("prune");
        let cfg = config(&db, &prefix, &lake, &[]);
        cdc_lake::ingest::migrate(&cfg).await.unwrap();
        let pod = Pod::start(cfg.clone());
        let client = pg(&db).await;
        wait_until(
            "every record in the raw log",
            Duration::from_secs(60),
            || async { checkpoint(&client, "raw", &topic).await == Some(5) },
        )
        .await;
        pod.stop().await;
        let report = cdc_lake::replay::prune::prune_raw(
            &cfg,
            chrono::Utc::now() + chrono::Duration::days(3650),
            false,
        )
        .await
        .unwrap();
        let left = offsets(
            &client,
            "SELECT kafka_offset FROM cdc_raw.cdc_events WHERE kafka_topic = $1 ORDER BY 1",
            &topic,
        )
        .await;
        let in_lake: BTreeSet<i64> = lake_coords(&lake.check())
            .into_iter()
            .map(|c| c.2)
            .collect();
        for o in &produced {
            assert!(
                left.contains(o) || in_lake.contains(o),
                "offset {o} is in neither the raw log nor the lake (pruned {} rows)",
                report.deleted()
            );
        }
        assert_eq!(
            report.deleted(),
            5,
            "the lake holds them all, so all may go"
        );
    });
}

/// A topic that starts over (deleted and created again, or a broker that lost its storage, as
/// the dev broker does on every restart) reuses offsets the sinks' checkpoints already passed.
/// Its records used to count as already stored and vanish. Now the raw log and the mirror take
/// up the new log from its start: the raw log holds exactly the new log, the old log's rows
/// moved to `cdc_raw.cdc_events_superseded`, the mirror holds the changes of both logs, and
/// each reset is recorded. The lake cannot take up a new log yet and keeps its checkpoint; the
/// pod reports that (docs/delivery-semantics.md, "A log that starts over").
#[test]
fn a_topic_that_starts_over_is_stored_from_its_start() {
    run_test(async {
        let prefix = unique("restart").replace('_', "-");
        let topic = format!("{prefix}.public.items");
        let record = |id: i64, lsn: i64| {
            rec(
                "items",
                &format!(r#"{{"id":{id}}}"#),
                &format!(r#"{{"id":{id},"v":"v{id}"}}"#),
                lsn,
            )
        };
        // The old log in one produce batch: the dev broker then reports a high watermark of 1
        // (one past the batch's first offset), so the pod must read the log to see that its
        // checkpoints are still inside it.
        create_topics(&BTreeSet::from([topic.clone()]), 1).await;
        let p = producer();
        let sends = (1..=40).map(|id| record(id, 1_000 + id)).map(|r| {
            let p = p.clone();
            let topic = topic.clone();
            async move {
                let fr = FutureRecord::to(&topic)
                    .partition(0)
                    .key(&r.key)
                    .payload(&r.value);
                p.send(fr, Duration::from_secs(10))
                    .await
                    .map(|d| d.offset)
                    .map_err(|(e, _)| e)
                    .unwrap()
            }
        });
        let mut old_offsets = futures::future::join_all(sends).await;
        assert_eq!(old_offsets, (0..40).collect::<Vec<i64>>());
        let db = fresh_db("restart").await;
        let lake = LakeTarget::local("restart");
        let cfg = config(&db, &prefix, &lake, &[("CDC_LAKE__BATCH__MAX_AGE", "50ms")]);
        cdc_lake::ingest::migrate(&cfg).await.unwrap();
        let client = pg(&db).await;
        let pod = Pod::start(cfg.clone());
        wait_for_raw_and_state(
            &client,
            &topic,
            40,
            "the old log in the raw log and the mirror",
            Duration::from_secs(60),
        )
        .await;
        pod.stop().await;
        // A restart on the same log moves nothing, whatever the watermark says.
        let pod = Pod::start(cfg.clone());
        old_offsets.extend(produce_to(&topic, &[record(41, 1_041)]).await);
        wait_for_raw_and_state(
            &client,
            &topic,
            41,
            "one more change",
            Duration::from_secs(60),
        )
        .await;
        pod.stop().await;
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_lake.log_resets").await,
            0,
            "a restart on the same log is no reset"
        );

        delete_topic(&topic).await;
        let new: Vec<Rec> = (101..=110).map(|id| record(id, 10_000 + id)).collect();
        let new_offsets = produce_to(&topic, &new).await;
        assert_eq!(
            new_offsets,
            (0..10).collect::<Vec<i64>>(),
            "the new log starts over"
        );
        let kept_before = METRICS
            .log_resets
            .with_label_values(&["lake", "kept"])
            .get();

        let pod = Pod::start(cfg.clone());
        wait_for_raw_and_state(
            &client,
            &topic,
            10,
            "the new log in the raw log and the mirror",
            Duration::from_secs(60),
        )
        .await;
        pod.stop().await;

        // The oracle is what the broker was given: (offset, id) of each log.
        let pairs = |offsets: &[i64], ids: std::ops::RangeInclusive<i64>| -> Vec<(i64, String)> {
            offsets
                .iter()
                .copied()
                .zip(ids.map(|i| i.to_string()))
                .collect()
        };
        let read = |table: &'static str| {
            let client = &client;
            let topic = &topic;
            async move {
                client
                    .query(
                        &format!(
                            "SELECT kafka_offset, after_data->>'id' FROM cdc_raw.{table}
                              WHERE kafka_topic = $1 ORDER BY 1"
                        ),
                        &[topic],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            read("cdc_events").await,
            pairs(&new_offsets, 101..=110),
            "the raw log holds the new log"
        );
        assert_eq!(
            read("cdc_events_superseded").await,
            pairs(&old_offsets, 1..=41),
            "the old log's rows are kept aside"
        );
        let mirrored: Vec<i64> = client
            .query("SELECT id FROM cdc_processed.items ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let both: Vec<i64> = (1..=41).chain(101..=110).collect();
        assert_eq!(mirrored, both, "the mirror holds the changes of both logs");
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_rejects").await,
            0,
            "a log that started over under a source that did not is no reject"
        );
        let resets: Vec<(String, i64, i64)> = client
            .query(
                "SELECT sink, stale_offset, log_start FROM cdc_lake.log_resets
                  WHERE kafka_topic = $1 ORDER BY 1",
                &[&topic],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            resets,
            vec![("raw".to_string(), 41, 0), ("state".to_string(), 41, 0)]
        );
        // The lake's limit, as documented: it kept its checkpoint, holds the old log only, and
        // the pod counted that.
        let in_lake: Vec<i64> = lake_coords(&lake.check())
            .into_iter()
            .filter(|c| c.0 == topic)
            .map(|c| c.2)
            .collect();
        assert_eq!(in_lake, old_offsets, "the lake holds the old log");
        assert!(
            METRICS
                .log_resets
                .with_label_values(&["lake", "kept"])
                .get()
                > kept_before
        );
    });
}

/// A source database created again (or restored to an earlier point) starts its WAL positions
/// over, and Debezium's new topic with them. Its changes to rows the mirror already holds are
/// behind those rows in position though committed later: the ordering guard alone would keep
/// the old rows without a trace. They are rejected at the mirror with the reason instead; new
/// keys apply, and the raw log stores every record. The oracle is what the broker was given.
#[test]
fn a_source_that_started_over_is_rejected_at_the_mirror_not_held_back() {
    run_test(async {
        let prefix = unique("rewind").replace('_', "-");
        let topic = format!("{prefix}.public.items");
        const OLD_TS: i64 = 1_795_239_028_962;
        let record = |id: i64, v: &str, lsn: i64, ts_ms: i64| Rec {
            key: format!(r#"{{"id":{id}}}"#),
            value: envelope("items", &format!(r#"{{"id":{id},"v":"{v}"}}"#), lsn, ts_ms),
            timestamp: None,
        };
        // The old log is longer than the new one, so the pod sees the new one start over.
        let old: Vec<Rec> = (1..=8)
            .map(|id| record(id, "old", 90_000 + id, OLD_TS))
            .collect();
        produce_to(&topic, &old).await;
        let db = fresh_db("rewind").await;
        let lake = LakeTarget::local("rewind");
        let cfg = config(&db, &prefix, &lake, &[("CDC_LAKE__BATCH__MAX_AGE", "50ms")]);
        cdc_lake::ingest::migrate(&cfg).await.unwrap();
        let client = pg(&db).await;
        let pod = Pod::start(cfg.clone());
        wait_until(
            "the old source in the mirror",
            Duration::from_secs(60),
            || async { checkpoint(&client, "state", &topic).await == Some(8) },
        )
        .await;
        pod.stop().await;

        // The new source: ids 1-3 again, far behind in position and an hour later; id 9 is new.
        // Id 4 is an old change of the old source delivered again (behind in position and in
        // time): the guard holds it back as it should, and it is no reject.
        delete_topic(&topic).await;
        let later = OLD_TS + 3_600_000;
        let mut new: Vec<Rec> = (1..=3)
            .map(|id| record(id, "new", 2_000 + id, later + id))
            .collect();
        new.push(record(9, "new", 2_009, later + 9));
        new.push(record(4, "older", 89_004, OLD_TS - 60_000));
        assert_eq!(produce_to(&topic, &new).await, vec![0, 1, 2, 3, 4]);
        let pod = Pod::start(cfg.clone());
        wait_for_raw_and_state(
            &client,
            &topic,
            5,
            "the new log at the mirror",
            Duration::from_secs(60),
        )
        .await;
        pod.stop().await;

        let rejects = state_rejects(&client, &topic).await;
        let offsets: Vec<i64> = rejects.iter().map(|r| r.0).collect();
        assert_eq!(
            offsets,
            vec![0, 1, 2],
            "the new source's changes to held rows: {rejects:?}"
        );
        for (offset, reason) in &rejects {
            let id = offset + 1;
            let positions = format!("commit LSN 0/{:X} < 0/{:X}", 2_000 + id, 90_000 + id);
            assert!(
                reason.contains("started over") && reason.contains(&positions),
                "{reason}"
            );
        }
        let mirror: Vec<(i64, String)> = pairs(
            &client,
            "SELECT id, v FROM cdc_processed.items ORDER BY 1",
            &[],
        )
        .await;
        let mut expected: Vec<(i64, String)> = (1..=8).map(|id| (id, "old".to_string())).collect();
        expected.push((9, "new".into()));
        assert_eq!(
            mirror, expected,
            "held rows stay as they were; a new key applies"
        );
        assert_eq!(
            count(
                &client,
                &format!("SELECT count(*) FROM cdc_raw.cdc_events WHERE kafka_topic = '{topic}'")
            )
            .await,
            5,
            "the raw log stores every record of the new log"
        );
    });
}

/// How far a log reaches, as the pod asks it when it takes a partition, against the real broker:
/// a checkpoint inside the log is inside it even when the broker's watermark says otherwise
/// (the dev broker reports one past the first offset of the last batch: 1 after 40 records in
/// one batch), and a checkpoint past the log is past it.
#[test]
fn the_log_probe_sees_the_log_end_past_a_short_watermark() {
    run_test(async {
        use cdc_lake::pipeline::Committer;
        let prefix = unique("probe").replace('_', "-");
        let topic = format!("{prefix}.public.items");
        create_topics(&BTreeSet::from([topic.clone()]), 1).await;
        let p = producer();
        let sends = (0..40).map(|i| {
            let (p, topic) = (p.clone(), topic.clone());
            async move {
                let value = format!("{i}");
                p.send(
                    FutureRecord::to(&topic)
                        .partition(0)
                        .key("k")
                        .payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .map(|d| d.offset)
                .map_err(|(e, _)| e)
                .unwrap()
            }
        });
        assert_eq!(
            futures::future::join_all(sends).await,
            (0..40).collect::<Vec<i64>>()
        );
        let db = fresh_db("probe").await;
        let lake = LakeTarget::local("probe");
        let cfg = config(&db, &prefix, &lake, &[]);
        let (events, _unused) = tokio::sync::mpsc::channel(1);
        let (consumer, _) =
            cdc_lake::source::create_consumer(&cfg.kafka, events, Duration::from_secs(1)).unwrap();
        let (_, watermark) = rdkafka::consumer::Consumer::fetch_watermarks(
            consumer.as_ref(),
            &topic,
            0,
            Duration::from_secs(5),
        )
        .unwrap();
        println!("high watermark after 40 records in one batch: {watermark}");
        let broker = cdc_lake::pipeline::KafkaBroker::new(consumer, &cfg.kafka);
        let tp = cdc_lake::domain::TopicPartition::new(&topic, 0);
        for (checkpoint, end) in [(40, 40), (25, 40.max(watermark)), (90, 40)] {
            let bounds = broker.log_bounds(&[(tp.clone(), checkpoint)]);
            let seen = bounds[&tp].end;
            assert!(
                seen >= end.min(checkpoint) && seen <= 40,
                "checkpoint {checkpoint}: the log reaches {seen}, expected {end}"
            );
            assert_eq!(
                checkpoint > seen,
                checkpoint > 40,
                "checkpoint {checkpoint} against a log of 40 records (reported end {seen})"
            );
        }
    });
}
