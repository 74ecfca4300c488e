//! Decoding alone, per wire format, on the same changes: the committed real Debezium captures
//! of the type zoo (`tests/fixtures/debezium/`) as schemaless JSON (`zoo-seed`), as
//! JsonConverter's `{schema, payload}` (`zoo-defaults`) and as Confluent-framed Avro
//! (`zoo-avro`, writer schemas served from memory as a registry client's cache would). Each
//! capture is decoded over and over for a fixed time; `tools/bench` reports the rates.
//!
//! Usage: cargo run --release --example decode_throughput -- [SECONDS_PER_FORMAT [FORMAT]]
//! Prints one JSON object: {"<format>": {"changes_per_s": …, "changes": …}, …}.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use cdc_lake::domain::KafkaCoordinates;
use cdc_lake::envelope::avro::{Lookup, WriterSchema};
use cdc_lake::envelope::{Decoded, Decoder};
use serde_json::Value;

// As in the binaries: the allocator is a large part of decoding's cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Record {
    coords: KafkaCoordinates,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/debezium")
        .join(name)
}

/// A capture's records; `binary` captures hold base64 bytes (`key_base64`, `value_base64`).
fn load(name: &str, binary: bool) -> Vec<Record> {
    let bytes = |v: &Value| -> Option<Vec<u8>> {
        let s = v.as_str()?;
        Some(if binary {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .expect("base64 in the capture")
        } else {
            s.as_bytes().to_vec()
        })
    };
    let (key, value) = if binary {
        ("key_base64", "value_base64")
    } else {
        ("key", "value")
    };
    std::fs::read_to_string(fixture(name))
        .expect("the committed capture")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("NDJSON");
            Record {
                coords: KafkaCoordinates {
                    topic: v["topic"].as_str().unwrap_or_default().to_string(),
                    partition: v["partition"].as_i64().unwrap_or(0) as i32,
                    offset: v["offset"].as_i64().unwrap_or(0),
                    timestamp_ms: None,
                },
                key: bytes(&v[key]),
                value: bytes(&v[value]),
            }
        })
        .collect()
}

/// Decodes the changes among `records` round after round for `time`: changes per second and
/// how many changes a round has. (Transaction markers and heartbeats, most of the zoo capture's
/// records, are left out: a pipeline's load is its changes.)
fn measure(
    records: &[Record],
    time: Duration,
    mut decode: impl FnMut(&mut Decoder, &Record) -> Decoded,
) -> (f64, usize) {
    let mut decoder = Decoder::new();
    let changes: Vec<&Record> = records
        .iter()
        .filter(|r| matches!(decode(&mut decoder, r), Decoded::Change(_)))
        .collect();
    let (start, mut decoded) = (Instant::now(), 0usize);
    while start.elapsed() < time {
        for r in &changes {
            std::hint::black_box(decode(&mut decoder, r));
        }
        decoded += changes.len();
    }
    (
        decoded as f64 / start.elapsed().as_secs_f64(),
        changes.len(),
    )
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SECONDS_PER_FORMAT is a number"))
        .unwrap_or(3.0);
    let time = Duration::from_secs_f64(seconds);
    // One format only (for a profile): json, json_with_schema or avro.
    let only = std::env::args().nth(2);
    let wanted = |format: &str| only.as_deref().is_none_or(|o| o == format);
    let schemas: HashMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(fixture("zoo-avro.schemas.json")).expect("the schemas"),
    )
    .expect("schemas JSON");
    let schemas: HashMap<u32, Arc<WriterSchema>> = schemas
        .into_iter()
        .map(|(id, text)| {
            let id: u32 = id.parse().expect("a numeric id");
            let schema = WriterSchema::parse(id, &text).expect("a writer schema");
            (id, Arc::new(schema))
        })
        .collect();
    let json = |d: &mut Decoder, r: &Record| {
        d.decode(r.coords.clone(), r.key.as_deref(), r.value.as_deref())
    };
    let mut out = serde_json::Map::new();
    for (format, name) in [
        ("json", "zoo-seed.ndjson"),
        ("json_with_schema", "zoo-defaults.ndjson"),
    ] {
        if !wanted(format) {
            continue;
        }
        let (rate, changes) = measure(&load(name, false), time, json);
        out.insert(
            format.into(),
            serde_json::json!({"changes_per_s": rate.round(), "changes": changes}),
        );
    }
    let avro = |d: &mut Decoder, r: &Record| {
        d.decode_avro(
            r.coords.clone(),
            r.key.as_deref(),
            r.value.as_deref(),
            |id| {
                Ok::<_, ()>(match schemas.get(&id) {
                    Some(w) => Lookup::Found(w.clone()),
                    None => Lookup::Unknown("not in the capture".into()),
                })
            },
        )
        .expect("the lookup never fails")
    };
    if wanted("avro") {
        let (rate, changes) = measure(&load("zoo-avro.ndjson", true), time, avro);
        out.insert(
            "avro".into(),
            serde_json::json!({"changes_per_s": rate.round(), "changes": changes}),
        );
    }
    println!("{}", Value::Object(out));
}
