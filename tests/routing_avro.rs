//! Routing in Avro (`format: avro`) with real Debezium publishing Avro through the registry
//! stand-in (tools/up --debezium). The oracle shares no code with cdc-lake: the source topics
//! and the output topics are read by consumers of the test's own and decoded by Confluent's
//! AvroConverter (tools/registry/AvroDecode.java). Which changes match is worked out from the
//! decoded source records; each routed record must equal its source record, field for field and
//! with the same Connect types, plus `filterMetadata` (and, in the `after` shape, `__op` and
//! `__deleted`). A filter added afterwards gets the same history by backfill (`cdc-replay
//! --target route:<id>`), from the Avro bytes the raw log keeps.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

const ROUTES: &str = "filters:
  - id: cancellations-avro
    consumer: finance
    tables: [public.orders]
    when:
      and:
        - { field: after.status, equals: CANCELLED }
        - { field: after.total, greaterThan: \"100.00\" }
    topic: OUT-cancellations-avro
    format: avro
  - id: scifi-avro
    consumer: storefront
    tables: [public.books]
    when:
      or:
        - { field: after.genre, equals: SciFi }
        - { field: before.genre, equals: SciFi }
    topic: OUT-scifi-avro
    output: after
    format: avro
";

/// Added once the live route has run: its history comes from the backfill alone.
const HISTORY: &str = "  - id: history-avro
    consumer: finance
    tables: [public.orders]
    when:
      and:
        - { field: after.status, equals: CANCELLED }
        - { field: after.total, greaterThan: \"100.00\" }
    topic: OUT-history-avro
    format: avro
";

/// A Connect Decimal as JsonConverter renders it (base64 of the unscaled big-endian two's
/// complement), as its unscaled value.
fn unscaled(v: &Value) -> i128 {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("a decimal is base64 text"))
        .unwrap();
    let mut n: i128 = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        -1
    } else {
        0
    };
    for b in bytes {
        n = (n << 8) | i128::from(b);
    }
    n
}

/// The oracle's verdicts, on source payloads as the AvroConverter decoded them.
fn cancellation(payload: &Value) -> bool {
    let after = &payload["after"];
    after["status"] == "CANCELLED" && unscaled(&after["total"]) > 10_000
}

fn scifi(payload: &Value) -> bool {
    payload["after"]["genre"] == "SciFi" || payload["before"]["genre"] == "SciFi"
}

type Coords = (String, i32, i64);

/// Every change record of a source topic, decoded by the AvroConverter (tombstones skipped).
fn decoded_source(topic: &str) -> BTreeMap<Coords, Value> {
    let records: Vec<_> = read_topic(topic)
        .into_iter()
        .filter_map(|r| {
            r.value
                .map(|v| ((topic.to_string(), r.partition, r.offset), v))
        })
        .collect();
    let values: Vec<Vec<u8>> = records.iter().map(|(_, v)| v.clone()).collect();
    records
        .into_iter()
        .map(|(k, _)| k)
        .zip(avro_converter_decode(topic, &values))
        .collect()
}

/// The routed records of `topic`, decoded by the AvroConverter, each source change once.
fn decoded_routed(topic: &str) -> BTreeMap<Coords, Value> {
    let routed = read_routed_bytes(topic);
    let twice = routed_twice(&routed);
    assert!(twice.is_empty(), "{topic}: routed twice: {twice:?}");
    let values: Vec<Vec<u8>> = routed.values().map(|v| v[0].clone()).collect();
    routed
        .into_keys()
        .zip(avro_converter_decode(topic, &values))
        .collect()
}

/// `fields` without the last `n`, and those `n`.
fn split_fields(schema: &Value, n: usize) -> (Vec<Value>, Vec<Value>) {
    let mut fields = schema["fields"]
        .as_array()
        .expect("a struct schema")
        .clone();
    let added = fields.split_off(fields.len() - n);
    (fields, added)
}

/// Routed records in the envelope shape against the source records: exactly the `want` set,
/// and each its source record, fields, types and values, plus filterMetadata.
fn check_envelopes(
    routed: &BTreeMap<Coords, Value>,
    source: &BTreeMap<Coords, Value>,
    want: &BTreeSet<&Coords>,
    filter: &str,
) {
    assert_eq!(
        &routed.keys().collect::<BTreeSet<_>>(),
        want,
        "{filter}: the matching changes, each once"
    );
    for (coords, r) in routed {
        let source = &source[coords];
        let (fields, _) = split_fields(&r["schema"], 1);
        assert_eq!(
            Value::from(fields),
            source["schema"]["fields"],
            "{coords:?}: the source's fields and types"
        );
        let mut payload = r["payload"].clone();
        payload.as_object_mut().unwrap().remove("filterMetadata");
        assert_eq!(
            payload, source["payload"],
            "{coords:?}: the source's values"
        );
        check_metadata(r, filter, "finance");
    }
}

fn check_metadata(routed: &Value, filter: &str, consumer: &str) {
    let (_, added) = split_fields(&routed["schema"], 1);
    assert_eq!(added[0]["field"], "filterMetadata");
    let at = &added[0]["fields"][2];
    assert_eq!(
        (at["field"].clone(), at["name"].clone()),
        (
            json!("filteredAt"),
            json!("org.apache.kafka.connect.data.Timestamp")
        ),
        "filteredAt is a Connect Timestamp"
    );
    let m = &routed["payload"]["filterMetadata"];
    assert_eq!(
        (m["filterId"].as_str(), m["consumerId"].as_str()),
        (Some(filter), Some(consumer))
    );
    assert!(
        m["filteredAt"]
            .as_i64()
            .is_some_and(|t| t > 1_700_000_000_000),
        "{m}"
    );
}

#[test]
fn avro_routes_equal_their_source_records_read_with_confluents_converter() {
    run_test(async {
        let stem = unique("routeavro").replace('_', "");
        let admin = pg(&format!("{}/postgres", source_base())).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {stem}"))
            .await
            .unwrap();
        let src = pg(&format!("{}/{stem}", source_base())).await;
        // Books keep their full row on delete, so a removed SciFi book is still SciFi.
        src.batch_execute(
            "CREATE TABLE orders (id integer PRIMARY KEY, status text NOT NULL, total numeric(10,2) NOT NULL);
             CREATE TABLE books (id integer PRIMARY KEY, title text NOT NULL, genre text NOT NULL, price numeric(10,2) NOT NULL);
             ALTER TABLE books REPLICA IDENTITY FULL;
             INSERT INTO books VALUES (1, 'Dune', 'SciFi', 9.99), (2, 'Emma', 'Classic', 5.00);",
        )
        .await
        .unwrap();
        let connector = Connector::start(&stem, &stem, "avro", &[]);

        let routes_path = std::env::temp_dir().join(format!("{stem}-routes.yaml"));
        std::fs::write(&routes_path, ROUTES.replace("OUT-", &format!("{stem}-"))).unwrap();
        let db = fresh_db("route_avro").await;
        let sink = pg(&db).await;
        let urls = format!("['{}']", registry_url());
        let routes_file = routes_path.to_str().unwrap().to_string();
        let cfg = config(
            &db,
            &stem,
            &LakeTarget::local("route-avro"),
            &[
                ("CDC_LAKE__KAFKA__FORMAT", "avro"),
                ("CDC_LAKE__KAFKA__SCHEMA_REGISTRY__URLS", urls.as_str()),
                ("CDC_LAKE__ROUTES__FILE", routes_file.as_str()),
                ("CDC_LAKE__LAKE__ENABLED", "false"),
            ],
        );
        let pod = Pod::start(cfg.clone());
        wait_until(
            "the Avro snapshot in the raw log (is Debezium running? tools/up --debezium)",
            Duration::from_secs(180),
            || async { count(&sink, "SELECT count(*) FROM cdc_raw.cdc_events").await == 2 },
        )
        .await;
        src.batch_execute(
            "INSERT INTO orders SELECT i, CASE WHEN i % 3 = 0 THEN 'CANCELLED' ELSE 'CONFIRMED' END,
                    (i * 7.31)::numeric(10,2) FROM generate_series(1, 60) i;
             INSERT INTO books SELECT 100 + i, 'book ' || i, CASE WHEN i % 2 = 0 THEN 'SciFi' ELSE 'Classic' END,
                    (i * 0.75)::numeric(10,2) FROM generate_series(1, 30) i;
             UPDATE orders SET status = 'CANCELLED', total = total + 50 WHERE id <= 20;
             UPDATE books SET genre = 'Classic' WHERE id BETWEEN 102 AND 106;
             DELETE FROM orders WHERE id BETWEEN 50 AND 55;
             DELETE FROM books WHERE id BETWEEN 110 AND 115;
             INSERT INTO orders VALUES (9999, 'CANCELLED', 1000.00);",
        )
        .await
        .unwrap();
        wait_until(
            "the last change in the raw log",
            Duration::from_secs(120),
            || async {
                count(
                    &sink,
                    "SELECT count(*) FROM cdc_raw.cdc_events WHERE after_data->>'id' = '9999'",
                )
                .await
                    == 1
            },
        )
        .await;
        wait_route_covers_raw_log(&sink).await;
        let rejects = count(&sink, "SELECT count(*) FROM cdc_raw.cdc_rejects").await;
        assert_eq!(rejects, 0, "no change was rejected");
        drop(pod);

        // Envelope shape: the source record as it was, plus filterMetadata.
        let orders = decoded_source(&format!("{stem}.public.orders"));
        let want: BTreeSet<&Coords> = orders
            .iter()
            .filter(|(_, v)| cancellation(&v["payload"]))
            .map(|(k, _)| k)
            .collect();
        assert!(
            want.len() > 10,
            "the traffic has cancellations: {}",
            want.len()
        );
        let routed = decoded_routed(&format!("{stem}-cancellations-avro"));
        check_envelopes(&routed, &orders, &want, "cancellations-avro");

        // A new Avro filter gets the same history from the raw log's Avro bytes (the pod is
        // stopped, so the backfill routes everything), and a second run routes nothing.
        let mut routes = std::fs::read_to_string(&routes_path).unwrap();
        routes.push_str(&HISTORY.replace("OUT-", &format!("{stem}-")));
        std::fs::write(&routes_path, routes).unwrap();
        let config_path = std::env::temp_dir().join(format!("{stem}.toml"));
        std::fs::write(&config_path, toml::to_string(&cfg).unwrap()).unwrap();
        let backfill = || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdc-replay"));
            cmd.args(["--config", config_path.to_str().unwrap()]).args([
                "--target",
                "route:history-avro",
                "--from-offset",
                "0",
            ]);
            let out = output_within(cmd, Duration::from_secs(120));
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{stdout}{stderr}");
            stdout
        };
        let first = backfill();
        assert!(
            first.contains(&format!(" {} routed", want.len())),
            "{first}"
        );
        assert!(
            backfill().contains(" 0 routed"),
            "a second backfill routes nothing"
        );
        let history = decoded_routed(&format!("{stem}-history-avro"));
        check_envelopes(&history, &orders, &want, "history-avro");

        // After shape: the row image (before for a delete), __op, __deleted, filterMetadata.
        let books = decoded_source(&format!("{stem}.public.books"));
        let want: BTreeSet<&Coords> = books
            .iter()
            .filter(|(_, v)| scifi(&v["payload"]))
            .map(|(k, _)| k)
            .collect();
        let deletes = want
            .iter()
            .filter(|k| books[**k]["payload"]["op"] == "d")
            .count();
        assert!(deletes >= 3, "the traffic deletes SciFi books: {deletes}");
        let routed = decoded_routed(&format!("{stem}-scifi-avro"));
        assert_eq!(
            routed.keys().collect::<BTreeSet<_>>(),
            want,
            "scifi: the matching changes, each once"
        );
        for (coords, r) in &routed {
            let source = &books[coords];
            let op = source["payload"]["op"].as_str().unwrap();
            let image = if op == "d" { "before" } else { "after" };
            let image_schema = source["schema"]["fields"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["field"] == image)
                .unwrap();
            let (fields, added) = split_fields(&r["schema"], 3);
            assert_eq!(
                Value::from(fields),
                image_schema["fields"],
                "{coords:?}: the row's fields and types"
            );
            assert_eq!(
                added.iter().map(|f| f["field"].clone()).collect::<Vec<_>>(),
                [json!("__op"), json!("__deleted"), json!("filterMetadata")]
            );
            let mut want_row = source["payload"][image].clone();
            let row = want_row.as_object_mut().unwrap();
            row.insert("__op".into(), json!(op));
            row.insert("__deleted".into(), json!((op == "d").to_string()));
            let mut payload = r["payload"].clone();
            payload.as_object_mut().unwrap().remove("filterMetadata");
            assert_eq!(payload, want_row, "{coords:?}: the row's values");
            check_metadata(r, "scifi-avro", "storefront");
        }
        drop(connector);
        drop_source_db(&stem).await;
    });
}
