//! Avro with a Schema Registry (issue 15), end to end with real services: real Debezium with
//! Confluent's Avro converter against the registry stand-in (tools/registry, Confluent's own
//! registry classes), the tansu broker, PostgreSQL and the S3 server.
//! - Changes reach the mirror within 5 s each; an added column reaches mirror and lake; the
//!   raw log keeps the exact bytes and each writer schema once; replays from the raw log and
//!   from the lake rebuild the live mirror. Oracle: the source database (rows and types).
//! - The registry stopped for 30 s under load: the pod is not ready, nothing is rejected or
//!   lost, and it catches up. Oracle: the source database.
//! - 100 corrupt records (bad magic, unknown ids, truncated datums) between the records of the
//!   committed Avro capture: each is rejected with its reason and exact bytes; the rest lands.
//!
//! Needs the dev stack with Debezium's jars (tools/up --debezium).
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cdc_lake::replay::{self, SourceKind};
use common::*;
use serde_json::Value;
use tokio_postgres::Client;

/// A source database with `public.orders`, ids 1..=5.
async fn source_db(db: &str) -> Client {
    let admin = pg(&format!("{}/postgres", source_base())).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let c = pg(&format!("{}/{db}", source_base())).await;
    c.batch_execute(
        "CREATE TABLE public.orders (id integer PRIMARY KEY, customer text NOT NULL,
                                     amount numeric(10,2) NOT NULL, placed_at timestamptz NOT NULL);
         INSERT INTO public.orders
         SELECT i, 'c-' || i, i * 10.25, timestamptz '2026-01-01 00:00+00' + i * interval '1 hour'
           FROM generate_series(1, 5) i;",
    )
    .await
    .unwrap();
    c
}

/// The pod's settings for Avro from `registry`.
fn avro_config(
    db: &str,
    prefix: &str,
    lake: &LakeTarget,
    registry: &str,
    extra: &[(&str, &str)],
) -> cdc_lake::config::Config {
    let urls = format!("['{registry}']");
    let mut env = vec![
        ("CDC_LAKE__KAFKA__FORMAT", "avro"),
        ("CDC_LAKE__KAFKA__SCHEMA_REGISTRY__URLS", urls.as_str()),
    ];
    env.extend_from_slice(extra);
    config(db, prefix, lake, &env)
}

async fn mirror_value(sink: &Client, id: i32) -> Option<String> {
    sink.query_opt(
        "SELECT customer FROM cdc_processed.orders WHERE id = $1",
        &[&id],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get(0))
}

#[test]
fn debezium_avro_reaches_mirror_lake_and_replays() {
    run_test(async {
        let name = unique("avroe2e");
        let source = source_db(&name).await;
        let connector = Connector::start(&name, &name, "avro", &[]);
        let lake = LakeTarget::s3("avro");
        let sink_db = fresh_db("avro").await;
        let cfg = avro_config(&sink_db, &name, &lake, &registry_url(), &[]);
        let pod = Pod::start(cfg.clone());
        let sink = pg(&sink_db).await;
        wait_until(
            "the Avro snapshot in the mirror (is Debezium running? tools/up --debezium)",
            Duration::from_secs(180),
            || async { count(&sink, "SELECT count(*) FROM cdc_processed.orders").await == 5 },
        )
        .await;

        // Each change is visible within 5 s of its commit.
        let within = Duration::from_secs(5);
        source
            .batch_execute("INSERT INTO public.orders VALUES (6, 'new', 1.5, now())")
            .await
            .unwrap();
        wait_until("the insert in the mirror", within, || async {
            mirror_value(&sink, 6).await.as_deref() == Some("new")
        })
        .await;
        source
            .batch_execute("UPDATE public.orders SET customer = 'changed' WHERE id = 6")
            .await
            .unwrap();
        wait_until("the update in the mirror", within, || async {
            mirror_value(&sink, 6).await.as_deref() == Some("changed")
        })
        .await;
        source
            .batch_execute("DELETE FROM public.orders WHERE id = 6")
            .await
            .unwrap();
        wait_until("the delete in the mirror", within, || async {
            mirror_value(&sink, 6).await.is_none()
        })
        .await;

        // A column added mid-stream: Debezium registers a new writer schema (the registry's
        // compatibility check passes it) and the mirror and the lake get the column.
        source
            .batch_execute(
                "ALTER TABLE public.orders ADD COLUMN note text;
                 INSERT INTO public.orders VALUES (7, 'noted', 2.25, now(), 'added');
                 UPDATE public.orders SET note = 'later' WHERE id = 1;",
            )
            .await
            .unwrap();
        wait_until(
            "the added column in the mirror",
            Duration::from_secs(60),
            || async {
                count(
                    &sink,
                    "SELECT count(*) FROM cdc_processed.orders WHERE id = 1 AND note = 'later'",
                )
                .await
                    == 1
            },
        )
        .await;
        let topic = format!("{name}.public.orders");
        let behind = format!(
            "SELECT count(*) FROM cdc_raw.cdc_events e
              WHERE e.kafka_topic = '{topic}'
                AND NOT EXISTS (SELECT 1 FROM cdc_lake.checkpoints c
                                 WHERE c.sink = 'state' AND c.kafka_topic = e.kafka_topic
                                   AND c.kafka_partition = e.kafka_partition
                                   AND c.next_offset > e.kafka_offset)"
        );
        wait_until(
            "the state checkpoint past every raw offset",
            Duration::from_secs(30),
            || async { count(&sink, &behind).await == 0 },
        )
        .await;
        pod.stop().await;

        // The mirror equals the source, rows and column types.
        let src_table = "public.orders";
        assert_eq!(
            order_rows(&sink, "cdc_processed.orders", &["note"]).await,
            order_rows(&source, src_table, &["note"]).await,
            "mirror rows"
        );
        let mut want_types =
            column_types(&source, "public", "orders", &ORDER_COLUMNS_WITH_NOTE).await;
        // Debezium's Avro for numeric(10,2) is a decimal of scale 2 (its precision is not
        // declared without connect.decimal.precision); the mirror keeps the scale.
        want_types.insert("amount".into(), "numeric".into());
        let got_types =
            column_types(&sink, "cdc_processed", "orders", &ORDER_COLUMNS_WITH_NOTE).await;
        for (column, want) in &want_types {
            let got = got_types
                .get(column)
                .map(String::as_str)
                .unwrap_or("missing");
            assert!(
                got.starts_with(want.as_str()),
                "mirror type of {column}: {got}, source {want}"
            );
        }

        // The raw log keeps every record's bytes and names its writer schemas, each stored once.
        let unframed = count(
            &sink,
            "SELECT count(*) FROM cdc_raw.cdc_events
              WHERE record_value IS NULL OR value_schema_id IS NULL
                 OR get_byte(record_value, 0) <> 0
                 OR substring(record_value from 2 for 4) <> int4send(value_schema_id::int)",
        )
        .await;
        assert_eq!(unframed, 0, "raw rows without their exact Avro bytes");
        let missing_schemas = count(
            &sink,
            "SELECT count(*) FROM cdc_raw.cdc_events e
              WHERE NOT EXISTS (SELECT 1 FROM cdc_raw.cdc_avro_schemas s WHERE s.id = e.value_schema_id)
                 OR (e.key_schema_id IS NOT NULL AND NOT EXISTS
                       (SELECT 1 FROM cdc_raw.cdc_avro_schemas s WHERE s.id = e.key_schema_id))",
        )
        .await;
        assert_eq!(
            missing_schemas, 0,
            "writer schemas missing from cdc_avro_schemas"
        );
        let value_schemas = count(
            &sink,
            &format!(
                "SELECT count(DISTINCT value_schema_id) FROM cdc_raw.cdc_events WHERE kafka_topic = '{topic}'"
            ),
        )
        .await;
        assert_eq!(
            value_schemas, 2,
            "the added column is a second writer schema"
        );
        // Each stored writer schema is what the registry serves for its id.
        let stored = sink
            .query("SELECT id, schema FROM cdc_raw.cdc_avro_schemas", &[])
            .await
            .unwrap();
        for row in stored {
            let (id, text): (i64, String) = (row.get(0), row.get(1));
            let url = format!("{}/schemas/ids/{id}", registry_url());
            let served = output_within(
                {
                    let mut c = std::process::Command::new("curl");
                    c.args(["-sf", &url]);
                    c
                },
                Duration::from_secs(30),
            );
            let served: Value = serde_json::from_slice(&served.stdout).unwrap();
            assert_eq!(
                served["schema"].as_str(),
                Some(text.as_str()),
                "schema {id}"
            );
        }

        // The lake: every raw record once, the added column typed, the fold equal to the source.
        let report = lake.check();
        assert_eq!(report["duplicates"], 0);
        let raw: std::collections::BTreeSet<_> = raw_coords(&sink)
            .await
            .into_iter()
            .map(|(t, p, o, _)| (t, p, o))
            .collect();
        assert_eq!(
            lake_coords(&report),
            raw,
            "lake and raw log hold the same records"
        );
        assert_eq!(
            report["types"]["public.orders"]["note"].as_str(),
            Some("string"),
            "the added column in the lake: {}",
            report["types"]
        );
        let avro_files = lake_avro_values(&lake);
        assert_eq!(
            avro_files,
            raw.len(),
            "every lake row keeps its Avro value bytes"
        );

        // Replays from the raw log and from the lake rebuild the live mirror.
        let target = cfg.target("processed").unwrap();
        for kind in [SourceKind::Raw, SourceKind::Lake] {
            let reader = replay::Reader::open(&cfg, kind).await.unwrap();
            let diffs = replay::compare::verify(&cfg, &target, &reader)
                .await
                .unwrap();
            assert!(
                !diffs.is_empty() && diffs.iter().all(|d| d.is_empty()),
                "{kind:?}: {diffs:?}"
            );
        }
        drop(connector);
        drop_source_db(&name).await;
    });
}

/// How many lake rows carry Avro value bytes that start with the Confluent magic byte.
fn lake_avro_values(lake: &LakeTarget) -> usize {
    let LakeTarget::S3 { prefix, .. } = lake else {
        unreachable!("the Avro tests use the S3 lake")
    };
    let script = "import sys, pyarrow.fs as pafs, pyarrow.parquet as pq\n\
        fs = pafs.S3FileSystem(endpoint_override=sys.argv[1], access_key='test', secret_key='test', scheme='http', region='us-east-1')\n\
        n = 0\n\
        for f in fs.get_file_info(pafs.FileSelector(sys.argv[2] + '/' + sys.argv[3], recursive=True)):\n\
        \x20   if f.path.endswith('.parquet'):\n\
        \x20       t = pq.read_table(f.path, filesystem=fs)\n\
        \x20       if 'avro_value' in t.column_names:\n\
        \x20           n += sum(1 for v in t.column('avro_value').to_pylist() if v and v[0] == 0)\n\
        print(n)";
    let endpoint = s3_endpoint().trim_start_matches("http://").to_string();
    let mut cmd = std::process::Command::new(python());
    cmd.args(["-c", script, &endpoint, "cdc-lake", prefix]);
    let out = output_within(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn a_registry_outage_under_load_stalls_nothing_and_loses_nothing() {
    run_test(async {
        // A registry of this test's own, so stopping it touches no other test.
        let port = (18200 + std::process::id() % 500).to_string();
        let env = [("REGISTRY_PORT", port.as_str())];
        let registry = format!("http://127.0.0.1:{port}");
        let own_registry = PrivateRegistry::start(&port);
        let name = unique("avrooutage");
        let source = source_db(&name).await;
        let connector = Connector::start(&name, &name, "avro", &env);
        let topic = format!("{name}.public.orders");
        // Debezium has registered its schemas once the snapshot is in the topic.
        wait_until(
            "the snapshot in the topic",
            Duration::from_secs(180),
            || async { topic_records(&topic).await >= 5 },
        )
        .await;

        lib_sh("stop_registry", &env);
        let stopped = Instant::now();
        // Load while the registry is down: Debezium keeps publishing with its cached ids.
        let writer = {
            let url = format!("{}/{name}", source_base());
            tokio::spawn(async move {
                let c = pg(&url).await;
                for i in 0..300 {
                    c.execute(
                        "INSERT INTO public.orders VALUES ($1, 'load', 1.0, now())",
                        &[&(1000 + i)],
                    )
                    .await
                    .unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let lake = LakeTarget::s3("avro-outage");
        let sink_db = fresh_db("avrooutage").await;
        let addr = format!("127.0.0.1:{}", 21000 + std::process::id() % 10000);
        let cfg = avro_config(
            &sink_db,
            &name,
            &lake,
            &registry,
            &[("CDC_LAKE__HTTP__LISTEN", addr.as_str())],
        );
        // A fresh pod knows no schema: every record waits for the registry.
        let pod = Pod::start(cfg);
        let sink = pg(&sink_db).await;
        let probe = addr.clone();
        wait_until(
            "the pod reports not ready for the registry",
            Duration::from_secs(30),
            || {
                let probe = probe.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        std::net::TcpStream::connect(&probe).is_ok() && {
                            let (status, body) = http_get(&probe, "/readyz");
                            status == 503 && body.contains("schema registry")
                        }
                    })
                    .await
                    .unwrap()
                }
            },
        )
        .await;
        while stopped.elapsed() < Duration::from_secs(30) {
            assert_eq!(
                count(&sink, "SELECT count(*) FROM cdc_raw.cdc_rejects")
                    .await
                    .max(0),
                0,
                "nothing is rejected while the registry is down"
            );
            assert_eq!(
                count(&sink, "SELECT count(*) FROM cdc_raw.cdc_events")
                    .await
                    .max(0),
                0,
                "nothing passes the records that wait"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        lib_sh("start_registry", &env);
        writer.await.unwrap();
        let want = 5 + 300;
        wait_until(
            "every change after the outage",
            Duration::from_secs(120),
            || async { count(&sink, "SELECT count(*) FROM cdc_processed.orders").await == want },
        )
        .await;
        let probe = addr.clone();
        wait_until(
            "the pod reports ready again",
            Duration::from_secs(30),
            || {
                let probe = probe.clone();
                async move {
                    tokio::task::spawn_blocking(move || http_get(&probe, "/readyz").0 == 200)
                        .await
                        .unwrap()
                }
            },
        )
        .await;
        pod.stop().await;
        assert_eq!(
            count(&sink, "SELECT count(*) FROM cdc_raw.cdc_rejects").await,
            0
        );
        // The source's own count: the snapshot and every insert, each once.
        assert_eq!(
            count(&sink, "SELECT count(*) FROM cdc_raw.cdc_events").await,
            count(&source, "SELECT count(*) FROM public.orders").await,
            "every change in the raw log, once"
        );
        assert_eq!(
            order_rows(&sink, "cdc_processed.orders", &[]).await,
            order_rows(&source, "public.orders", &[]).await
        );
        drop(connector);
        drop(own_registry);
        drop_source_db(&name).await;
    });
}

/// A Schema Registry stand-in of one test's own (tools/lib.sh start_registry on `port`),
/// stopped when dropped.
struct PrivateRegistry {
    port: String,
}

impl PrivateRegistry {
    fn start(port: &str) -> Self {
        lib_sh("start_registry", &[("REGISTRY_PORT", port)]);
        Self { port: port.into() }
    }
}

impl Drop for PrivateRegistry {
    fn drop(&mut self) {
        lib_sh("stop_registry", &[("REGISTRY_PORT", self.port.as_str())]);
    }
}

/// Records in `topic` now, counted by reading it from the beginning (tansu's high watermark
/// lags behind the last produced batch, so it cannot be the count).
async fn topic_records(topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker())
            .set("group.id", unique("count"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let Ok(meta) = c.fetch_metadata(Some(&topic), Duration::from_secs(5)) else {
            return 0;
        };
        let mut assignment = rdkafka::TopicPartitionList::new();
        for t in meta.topics() {
            for p in t.partitions() {
                assignment
                    .add_partition_offset(&topic, p.id(), rdkafka::Offset::Beginning)
                    .unwrap();
            }
        }
        if assignment.count() == 0 || c.assign(&assignment).is_err() {
            return 0;
        }
        let mut n = 0;
        while let Some(m) = c.poll(Duration::from_millis(1000)) {
            if m.is_ok() {
                n += 1;
            }
        }
        n
    })
    .await
    .unwrap()
}

#[test]
fn corrupt_avro_records_are_rejected_and_the_stream_continues() {
    run_test(async {
        let prefix = unique("avrobad").replace('_', "-");
        let good = committed_avro_capture(&prefix).await;
        let zoo_topic = format!("{prefix}.public.type_zoo");
        let template = good
            .iter()
            .find(|r| r.topic == zoo_topic && r.value.is_some())
            .unwrap()
            .clone();
        let valid = template.value.clone().unwrap();
        // 100 bad records, in three kinds, between the good ones.
        let mut bad = Vec::new();
        for i in 0..100 {
            let value = match i % 3 {
                0 => [&[1u8][..], &valid[1..]].concat(),
                1 => [&[0u8, 0x7f, 0xff, 0xff, 0xf0][..], &valid[5..]].concat(),
                _ => valid[..valid.len() / 2].to_vec(),
            };
            bad.push(BinaryRecord {
                value: Some(value),
                ..template.clone()
            });
        }
        let mut records = Vec::new();
        let mut bad_iter = bad.into_iter();
        for (i, r) in good.iter().enumerate() {
            records.push(r.clone());
            if i % 2 == 0 {
                records.extend(bad_iter.by_ref().take(3));
            }
        }
        records.extend(bad_iter);
        // The JSON capture of the same zoo workload says how many envelopes carry an op
        // (tests/decode_avro proves both captures decode to the same changes).
        let stored = load_fixture("zoo-defaults.ndjson")
            .iter()
            .filter(|r| r.value.as_deref().is_some_and(|v| v.contains(r#""op":"#)))
            .count() as i64;
        produce_bytes(&records).await;

        let lake = LakeTarget::s3("avro-bad");
        let db = fresh_db("avrobad").await;
        let mut cfg = avro_config(&db, &prefix, &lake, &registry_url(), &[]);
        cfg.state
            .key_columns
            .insert("public.zoo_nokey".into(), vec!["sku".into()]);
        let pod = Pod::start(cfg);
        let client = pg(&db).await;
        let rejected = "SELECT count(*) FROM cdc_raw.cdc_rejects WHERE stage = 'decode'";
        wait_until(
            "every record stored or rejected",
            Duration::from_secs(120),
            || async {
                count(&client, rejected).await == 100
                    && count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await == stored
            },
        )
        .await;
        pod.stop().await;
        let reasons = client
            .query(
                "SELECT reason, raw_value FROM cdc_raw.cdc_rejects WHERE stage = 'decode' ORDER BY kafka_offset",
                &[],
            )
            .await
            .unwrap();
        let (mut magic, mut unknown, mut datum) = (0, 0, 0);
        for r in &reasons {
            let (reason, bytes): (String, Vec<u8>) = (r.get(0), r.get(1));
            if reason.contains("magic byte is 0x01") {
                magic += 1;
                assert_eq!(bytes[0], 1, "the exact bytes");
            } else if reason.contains("schema id 2147483632") && reason.contains("does not know") {
                unknown += 1;
            } else if reason.contains("do not decode") {
                datum += 1;
                assert_eq!(bytes, valid[..valid.len() / 2], "the exact bytes");
            } else {
                panic!("unexpected reason: {reason}");
            }
        }
        assert_eq!((magic, unknown, datum), (34, 33, 33));
        // Everything good landed: every envelope with an op in the raw log (tombstones,
        // heartbeats and transaction markers are counted skips, as for JSON).
        let events = count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await;
        assert_eq!(events, stored, "every good change in the raw log");
        let ops: Vec<String> = client
            .query(
                "SELECT DISTINCT operation FROM cdc_raw.cdc_events ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(ops, ["c", "d", "m", "r", "t", "u"]);
        let mirror = count(&client, "SELECT count(*) FROM cdc_processed.type_zoo").await;
        assert!(mirror > 0, "the zoo's rows reached the mirror");
    });
}

#[test]
fn an_avro_reject_goes_through_on_reprocess_once_the_registry_knows_its_schema() {
    run_test(async {
        use base64::Engine as _;
        // A registry of this test's own, so the ids it hands out are this test's alone.
        let port = (17700 + std::process::id() % 300).to_string();
        let registry = format!("http://127.0.0.1:{port}");
        let _own_registry = PrivateRegistry::start(&port);
        let schemas: BTreeMap<u32, String> = serde_json::from_str::<BTreeMap<String, String>>(
            &std::fs::read_to_string(fixture_path("zoo-avro.schemas.json")).unwrap(),
        )
        .unwrap()
        .into_iter()
        .map(|(id, text)| (id.parse().unwrap(), text))
        .collect();
        // One change of the type zoo, as Debezium published it.
        let captured: Value = std::fs::read_to_string(fixture_path("zoo-avro.ndjson"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|v| {
                v["topic"].as_str().unwrap().ends_with(".public.type_zoo")
                    && v["value_base64"].is_string()
            })
            .unwrap();
        let bytes = |field: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(captured[field].as_str().unwrap())
                .unwrap()
        };
        let (mut key, mut value) = (bytes("key_base64"), bytes("value_base64"));
        let schema_id = |b: &[u8]| u32::from_be_bytes(b[1..5].try_into().unwrap());
        let prefix = unique("avroreproc").replace('_', "-");
        let key_id = register_schema(
            &registry,
            &format!("{prefix}-key"),
            &schemas[&schema_id(&key)],
        );
        // The value schema with a doc of this run's own is new to the registry, so it gets the
        // id after the probe's once it is registered. Until then the record names an id the
        // registry does not know, as when a producer's registration went to another registry.
        let mut value_schema: Value = serde_json::from_str(&schemas[&schema_id(&value)]).unwrap();
        value_schema["doc"] = Value::String(prefix.clone());
        let probe =
            serde_json::json!({"type": "record", "name": "Probe", "doc": prefix, "fields": []});
        let value_id =
            register_schema(&registry, &format!("{prefix}-probe"), &probe.to_string()) + 1;
        key[1..5].copy_from_slice(&key_id.to_be_bytes());
        value[1..5].copy_from_slice(&value_id.to_be_bytes());
        let topic = format!("{prefix}.public.type_zoo");
        produce_bytes(&[BinaryRecord {
            topic: topic.clone(),
            partition: 0,
            key: Some(key.clone()),
            value: Some(value.clone()),
        }])
        .await;

        let lake = LakeTarget::local("avro-reprocess");
        let db = fresh_db("avroreproc").await;
        let cfg = avro_config(&db, &prefix, &lake, &registry, &[]);
        let pod = Pod::start(cfg.clone());
        let client = pg(&db).await;
        let rejected = "SELECT count(*) FROM cdc_raw.cdc_rejects WHERE stage = 'decode'";
        wait_until("the record rejected", Duration::from_secs(60), || async {
            count(&client, rejected).await == 1
        })
        .await;
        pod.stop().await;
        let unknown = format!("schema id {value_id}");
        let reason: String = client
            .query_one("SELECT reason FROM cdc_raw.cdc_rejects", &[])
            .await
            .unwrap()
            .get(0);
        assert!(reason.contains(&unknown), "{reason}");

        let all = cdc_lake::rejects::RejectFilter::default();
        let report = cdc_lake::rejects::reprocess(&cfg, &all, false)
            .await
            .unwrap();
        assert_eq!(report.recovered_decode, 0, "the id is still unknown");
        assert!(
            report.still_rejected.keys().any(|r| r.contains(&unknown)),
            "decoded again as Avro: {:?}",
            report.still_rejected
        );

        let registered = register_schema(
            &registry,
            &format!("{topic}-value"),
            &value_schema.to_string(),
        );
        assert_eq!(registered, value_id, "the registry hands out ids in order");
        let report = cdc_lake::rejects::reprocess(&cfg, &all, false)
            .await
            .unwrap();
        assert_eq!(report.recovered_decode, 1, "{:?}", report.still_rejected);
        assert_eq!(count(&client, rejected).await, 0);
        let stored = client
            .query_one(
                "SELECT value_schema_id, record_value, record_key FROM cdc_raw.cdc_events",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(stored.get::<_, Option<i64>>(0), Some(i64::from(value_id)));
        assert_eq!(
            stored.get::<_, Option<Vec<u8>>>(1),
            Some(value),
            "the exact bytes"
        );
        assert_eq!(stored.get::<_, Option<Vec<u8>>>(2), Some(key));
        let schema_stored =
            format!("SELECT count(*) FROM cdc_raw.cdc_avro_schemas WHERE id = {value_id}");
        assert_eq!(
            count(&client, &schema_stored).await,
            1,
            "the writer schema kept"
        );
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_processed.type_zoo").await,
            1,
            "the change reached the mirror"
        );
    });
}
