//! Debezium's Avro output decodes to the same change events as its `{schema, payload}` JSON.
//!
//! Both fixtures are real Debezium 3.6.3 captures of the same type-zoo rows and changes
//! (`tools/capture-zoo`): `zoo-avro.ndjson` through Confluent's Avro converter and the registry
//! stand-in (exact record bytes, writer schemas by id in `zoo-avro.schemas.json`),
//! `zoo-defaults.ndjson` through JsonConverter with schemas. The oracle is the JSON capture,
//! decoded by the JSON path: every record must give the same outcome, operation, table, key,
//! row images (values compared by their JSON type, numbers numerically) and column types.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use cdc_lake::domain::KafkaCoordinates;
use cdc_lake::envelope::avro::{unframe, Lookup, WriterSchema};
use cdc_lake::envelope::{Decoded, Decoder};
use common::*;
use serde_json::Value;

struct AvroRecord {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

fn avro_fixture() -> (Vec<AvroRecord>, HashMap<u32, Arc<WriterSchema>>) {
    let b64 = |v: &Value| {
        v.as_str()
            .map(|s| base64::engine::general_purpose::STANDARD.decode(s).unwrap())
    };
    let records = std::fs::read_to_string(fixture_path("zoo-avro.ndjson"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            AvroRecord {
                topic: v["topic"].as_str().unwrap().into(),
                partition: v["partition"].as_i64().unwrap() as i32,
                offset: v["offset"].as_i64().unwrap(),
                key: b64(&v["key_base64"]),
                value: b64(&v["value_base64"]),
            }
        })
        .collect();
    let schemas: HashMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("zoo-avro.schemas.json")).unwrap(),
    )
    .unwrap();
    let schemas = schemas
        .into_iter()
        .map(|(id, text)| {
            let id: u32 = id.parse().unwrap();
            (id, Arc::new(WriterSchema::parse(id, &text).unwrap()))
        })
        .collect();
    (records, schemas)
}

fn coords(topic: &str, partition: i32, offset: i64) -> KafkaCoordinates {
    KafkaCoordinates {
        topic: topic.into(),
        partition,
        offset,
        timestamp_ms: None,
    }
}

/// The topic without its connector prefix (`zoodef.public.type_zoo` → `public.type_zoo`).
fn unprefixed(topic: &str) -> String {
    if topic.starts_with("__debezium-heartbeat.") {
        return "heartbeat".into();
    }
    topic
        .split_once('.')
        .map_or(topic, |(_, rest)| rest)
        .to_string()
}

/// What a record decoded to, without what differs by capture (connector names, offsets, times).
#[derive(Debug, PartialEq)]
enum Outcome {
    Change(Box<Change>),
    Skip(String),
    Reject(String),
}

#[derive(Debug, PartialEq)]
struct Change {
    op: String,
    table: String,
    key: Option<Value>,
    before: Option<Value>,
    after: Option<Value>,
    columns: Vec<(String, String)>,
}

/// Numbers compare by value (JsonConverter and the Avro path may spell a float differently:
/// `1.0E10` and `1e10`); everything else by JSON type and value.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Number(n) if n.as_i64().is_none() && n.as_u64().is_none() => {
            Value::String(format!("float:{:?}", n.as_f64().unwrap()))
        }
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), normalized(v))).collect())
        }
        other => other.clone(),
    }
}

fn outcome(d: Decoded) -> Outcome {
    match d {
        Decoded::Change(e) => Outcome::Change(Box::new(Change {
            op: e.op.code().into(),
            table: e.table.to_string(),
            key: e.key.as_ref().map(normalized),
            before: e.before.clone().map(|m| normalized(&Value::Object(m))),
            after: e.after.clone().map(|m| normalized(&Value::Object(m))),
            columns: e
                .schema
                .columns
                .iter()
                .map(|c| (c.name.clone(), format!("{:?}", c.ty)))
                .collect(),
        })),
        Decoded::Skip(_, reason) => Outcome::Skip(reason.as_str().into()),
        Decoded::Reject(r) => Outcome::Reject(r.reason),
    }
}

/// Outcomes per unprefixed topic and record key, in offset order. (The two captures partition
/// by different key bytes, so only the order of one key's records is the same in both.)
/// Records of other topics (transaction markers, heartbeats, logical messages) are keyed by
/// transaction ids and server names, which differ by capture: they compare as a set.
fn by_key(outcomes: Vec<Decoding>) -> HashMap<(String, String), Vec<Outcome>> {
    let mut sorted = outcomes;
    sorted.sort_by(|a, b| (&a.topic, &a.key, a.offset).cmp(&(&b.topic, &b.key, b.offset)));
    let mut out: HashMap<(String, String), Vec<Outcome>> = HashMap::new();
    for d in sorted {
        let key = if d.topic.starts_with("public.") {
            d.key
        } else {
            String::new()
        };
        out.entry((d.topic, key)).or_default().push(d.outcome);
    }
    for ((topic, _), outcomes) in out.iter_mut() {
        if !topic.starts_with("public.") {
            outcomes.sort_by_key(|o| format!("{o:?}"));
        }
    }
    out
}

/// One record's decoding, with the topic without its prefix and the record key as JSON text.
struct Decoding {
    topic: String,
    key: String,
    offset: i64,
    outcome: Outcome,
}

impl Decoding {
    fn new(topic: &str, offset: i64, key: Option<Value>, decoded: Decoded) -> Self {
        Decoding {
            topic: unprefixed(topic),
            key: key.map_or(String::new(), |k| normalized(&k).to_string()),
            offset,
            outcome: outcome(decoded),
        }
    }
}

/// Writer schemas from the capture, as a registry lookup that never fails to answer.
fn lookup<'a>(
    schemas: &'a HashMap<u32, Arc<WriterSchema>>,
    unknown: &'static str,
) -> impl FnMut(u32) -> Result<Lookup, ()> + 'a {
    move |id| {
        Ok(match schemas.get(&id) {
            Some(w) => Lookup::Found(w.clone()),
            None => Lookup::Unknown(unknown.into()),
        })
    }
}

#[test]
fn the_avro_capture_decodes_to_the_same_changes_as_the_json_capture() {
    let (records, schemas) = avro_fixture();
    let mut decoder = Decoder::new();
    let avro: Vec<_> = records
        .iter()
        .map(|r| {
            let d = decoder
                .decode_avro(
                    coords(&r.topic, r.partition, r.offset),
                    r.key.as_deref(),
                    r.value.as_deref(),
                    lookup(&schemas, "not in the capture"),
                )
                .unwrap();
            let key = r.key.as_deref().map(|k| {
                let (id, datum) = unframe(k).unwrap();
                schemas[&id].decode(datum).unwrap()
            });
            Decoding::new(&r.topic, r.offset, key, d)
        })
        .collect();
    let mut decoder = Decoder::new();
    let json: Vec<_> = load_fixture("zoo-defaults.ndjson")
        .into_iter()
        .map(|r| {
            let d = decoder.decode(
                coords(&r.topic, r.partition, r.offset),
                r.key.as_deref().map(str::as_bytes),
                r.value.as_deref().map(str::as_bytes),
            );
            let key = r.key.as_deref().map(|k| {
                let mut v: Value = serde_json::from_str(k).unwrap();
                if let Some(payload) = v.get_mut("payload") {
                    v = payload.take();
                }
                v
            });
            Decoding::new(&r.topic, r.offset, key, d)
        })
        .collect();
    assert_eq!(avro.len(), json.len());
    let changes = avro
        .iter()
        .filter(|d| matches!(d.outcome, Outcome::Change(_)))
        .count();
    assert!(
        changes >= 20,
        "the zoo has changes of every kind: {changes}"
    );
    let (avro, json) = (by_key(avro), by_key(json));
    let mut keys: Vec<&(String, String)> = json.keys().collect();
    keys.sort();
    assert_eq!(avro.len(), json.len(), "the same topics and keys");
    for k in keys {
        let a = avro.get(k).unwrap_or_else(|| {
            let theirs: Vec<_> = avro.keys().filter(|(t, _)| *t == k.0).collect();
            panic!("{k:?} is in the JSON capture only; the Avro capture has {theirs:?}")
        });
        let j = &json[k];
        assert_eq!(a.len(), j.len(), "{k:?}: record count");
        for (i, (a, j)) in a.iter().zip(j).enumerate() {
            assert_eq!(
                a, j,
                "{k:?} record {i}: Avro (left) and JSON (right) differ"
            );
        }
    }
}

#[test]
fn corrupt_avro_is_rejected_with_its_exact_bytes() {
    let (records, schemas) = avro_fixture();
    let change = records
        .iter()
        .find(|r| r.topic.ends_with("public.type_zoo") && r.value.is_some())
        .unwrap();
    let value = change.value.clone().unwrap();
    let mut truncated = value.clone();
    truncated.truncate(value.len() / 2);
    let mut unknown_id = value.clone();
    unknown_id[1..5].copy_from_slice(&9999u32.to_be_bytes());
    let mut bad_magic = value.clone();
    bad_magic[0] = 7;
    let cases = [
        (truncated, "do not decode against writer schema"),
        (unknown_id, "schema id 9999: Schema not found"),
        (bad_magic, "magic byte is 0x07"),
        (b"{\"op\":\"c\"}".to_vec(), "not Confluent-framed Avro"),
    ];
    let mut decoder = Decoder::new();
    for (bytes, want) in cases {
        let d = decoder
            .decode_avro(
                coords("t", 0, 1),
                change.key.as_deref(),
                Some(&bytes),
                lookup(&schemas, "Schema not found (40403)"),
            )
            .unwrap();
        match d {
            Decoded::Reject(r) => {
                assert!(r.reason.contains(want), "want {want:?} in {}", r.reason);
                assert_eq!(r.value.as_deref(), Some(&bytes[..]), "exact bytes kept");
                assert_eq!(r.key, change.key, "exact key bytes kept");
                assert_eq!(r.kind, "invalid_avro");
            }
            other => panic!("{want}: expected a reject, got {other:?}"),
        }
    }
    // A registry that cannot answer is not a reject: the caller retries.
    let down = decoder.decode_avro(coords("t", 0, 2), None, Some(&value), |_| {
        Err::<Lookup, _>("registry unreachable")
    });
    assert_eq!(down.err(), Some("registry unreachable"));
}

/// Everything a decoded record carries except the Avro bytes, as one comparable value.
fn whole(d: &Decoded) -> String {
    match d {
        Decoded::Change(e) => format!(
            "change key={:?} op={:?} table={} before={:?} after={:?} values={:?} source={:?} \
             source_json={} transaction={:?} ts_ms={:?} schema={:?} position={:?} \
             envelope={} raw_key={:?}",
            e.key,
            e.op,
            e.table,
            e.before,
            e.after,
            e.values,
            e.source,
            e.source_text(),
            e.transaction.as_ref().map(|t| t.get()),
            e.ts_ms,
            e.schema,
            e.position,
            // An Avro change carries its payload's text; with the schema it is the record as
            // JsonConverter writes it.
            match &e.avro {
                Some(a) => a.value_schema.envelope_json(&e.raw_value),
                None => e.raw_value.to_string(),
            },
            e.raw_key
        ),
        Decoded::Skip(c, reason) => format!("skip {c:?} {reason:?}"),
        Decoded::Reject(r) => format!("reject {} {}", r.kind, r.reason),
    }
}

#[test]
fn avro_decodes_to_exactly_what_its_json_converter_rendering_decodes_to() {
    // The Avro path builds the change from the decoded datum without rendering and parsing
    // JSON. The oracle is the JSON path fed the JsonConverter form of the same datum: every
    // field of every record (source block text, transaction, positions, schema) must match.
    let (records, schemas) = avro_fixture();
    let render = |bytes: &[u8], envelope: bool| {
        let (id, datum) = unframe(bytes).unwrap();
        let payload = schemas[&id].decode(datum).unwrap();
        if envelope {
            serde_json::json!({"schema": schemas[&id].connect_schema(), "payload": payload})
                .to_string()
        } else {
            payload.to_string()
        }
    };
    let (mut direct, mut via_json) = (Decoder::new(), Decoder::new());
    let mut changes = 0;
    for r in &records {
        let at = coords(&r.topic, r.partition, r.offset);
        let got = direct
            .decode_avro(
                at.clone(),
                r.key.as_deref(),
                r.value.as_deref(),
                lookup(&schemas, "not in the capture"),
            )
            .unwrap();
        let key = r.key.as_deref().map(|k| render(k, false));
        let value = r.value.as_deref().map(|v| render(v, true));
        let want = via_json.decode(
            at,
            key.as_deref().map(str::as_bytes),
            value.as_deref().map(str::as_bytes),
        );
        assert_eq!(whole(&got), whole(&want), "{} offset {}", r.topic, r.offset);
        if let Decoded::Change(e) = &got {
            changes += 1;
            let avro = e.avro.as_ref().expect("an Avro change keeps its bytes");
            assert_eq!(Some(&avro.value), r.value.as_ref());
            assert_eq!(avro.key, r.key);
        }
    }
    assert!(changes >= 20, "the capture has changes: {changes}");
}
