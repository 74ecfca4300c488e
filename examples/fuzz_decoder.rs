//! A mutation fuzzer for the decoder and what runs on its output (run through `tools/fuzz`).
//!
//! cargo-fuzz needs a nightly toolchain, which this machine cannot fetch; this is the
//! equivalent with the stable one. Seeded with the captured Debezium samples, it mutates records
//! (byte flips, truncations, splices, and JSON-aware edits: a node replaced by a hostile value,
//! a key dropped, the op or a schema type changed) and feeds each to the decoder, then to
//! everything that consumes a decoded change: the PostgreSQL conversion of both images, the
//! mirror type mapping and the Parquet encoder. The property: nothing panics; every record ends
//! as a change, a counted skip or a reject with a reason. A panicking input is written to
//! `fuzz-crashes/` and the run fails.
//!
//! Usage: cargo run --release --example fuzz_decoder -- [SECONDS] [SEED]
//!        cargo run --release --example fuzz_decoder -- fuzz-crashes/crash-N.json   (replay one)

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use cdc_lake::domain::KafkaCoordinates;
use cdc_lake::envelope::{Decoded, Decoder};
use cdc_lake::sink::lake::encode::encode_parquet;
use cdc_lake::sink::state::pg_type;
use serde_json::Value;

/// xorshift64*: small, fast, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that have broken JSON consumers before: huge and tiny numbers, odd strings, deep
/// nesting, the TOAST placeholder, wrong types for logical types.
fn hostile(rng: &mut Rng) -> Value {
    let pick: [Value; 18] = [
        Value::Null,
        serde_json::json!(true),
        serde_json::json!(-1),
        serde_json::json!(i64::MAX),
        serde_json::json!(u64::MAX),
        serde_json::json!(1e308),
        serde_json::json!(-0.0),
        serde_json::json!(""),
        serde_json::json!("\u{0000}nul"),
        serde_json::json!("ünïcödé ☃ 𝄞"),
        serde_json::json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="),
        serde_json::json!("NaN"),
        serde_json::json!("-Infinity"),
        serde_json::json!("__debezium_unavailable_value"),
        serde_json::json!({"scale": 400, "value": "AQ=="}),
        serde_json::json!({"scale": -3, "value": "not base64"}),
        serde_json::json!([[[[[[[[[[[]]]]]]]]]]]),
        serde_json::json!("2024-02-30T25:61:61.999999999+99:99"),
    ];
    pick[rng.below(pick.len())].clone()
}

/// Replaces, drops or retypes one random node of a JSON document.
fn mutate_json(v: &mut Value, rng: &mut Rng, depth: usize) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = keys[rng.below(keys.len())].clone();
            match rng.below(6) {
                0 => {
                    m.remove(&k);
                }
                1 => {
                    m.insert(k, hostile(rng));
                }
                2 if k == "op" => {
                    m.insert(
                        k,
                        Value::String(["c", "u", "d", "r", "t", "m", "x", ""][rng.below(8)].into()),
                    );
                }
                3 if k == "name" || k == "type" => {
                    let names = [
                        "org.apache.kafka.connect.data.Decimal",
                        "io.debezium.data.VariableScaleDecimal",
                        "io.debezium.time.MicroTimestamp",
                        "io.debezium.time.NanoTime",
                        "io.debezium.time.ZonedTimestamp",
                        "io.debezium.time.Date",
                        "io.debezium.data.Uuid",
                        "bytes",
                        "int8",
                        "float32",
                        "struct",
                    ];
                    m.insert(k, Value::String(names[rng.below(names.len())].into()));
                }
                _ if depth < 12 => {
                    if let Some(child) = m.get_mut(&k) {
                        mutate_json(child, rng, depth + 1);
                    }
                }
                _ => {}
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.below(a.len());
            if rng.below(3) == 0 {
                a.remove(i);
            } else if depth < 12 {
                mutate_json(&mut a[i], rng, depth + 1);
            }
        }
        other => *other = hostile(rng),
    }
}

fn mutate_bytes(b: &mut Vec<u8>, rng: &mut Rng, other: &[u8]) {
    match rng.below(5) {
        0 if !b.is_empty() => {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        1 => b.truncate(rng.below(b.len() + 1)),
        2 if !b.is_empty() => {
            let i = rng.below(b.len());
            b.insert(i, [b'"', b'{', b'}', b'\\', 0xff, b',', b':'][rng.below(7)]);
        }
        3 => {
            let cut = rng.below(b.len() + 1);
            let from = rng.below(other.len() + 1);
            b.truncate(cut);
            b.extend_from_slice(&other[from..]);
        }
        _ if !b.is_empty() => {
            let i = rng.below(b.len());
            b.remove(i);
        }
        _ => {}
    }
}

/// Everything downstream of the decoder that a change reaches.
fn consume(d: &Decoded) -> &'static str {
    match d {
        Decoded::Change(e) => {
            for image in [&e.before, &e.after].into_iter().flatten() {
                let _ = e.sql_image(image, true);
                let _ = e.sql_image(image, false);
            }
            for c in &e.schema.columns {
                let _ = pg_type(&c.ty);
            }
            let _ = e.size_bytes();
            let _ = e.event_time_ms();
            let _ = encode_parquet(std::slice::from_ref(e));
            "change"
        }
        Decoded::Skip(..) => "skip",
        Decoded::Reject(r) => {
            assert!(!r.reason.is_empty(), "a reject without a reason");
            "reject"
        }
    }
}

fn main() {
    // `fuzz_decoder FILE`: run one saved input with the panic message shown.
    if let Some(path) = std::env::args().nth(1).filter(|a| a.ends_with(".json")) {
        let value = std::fs::read(&path).expect("crash file");
        let coords = KafkaCoordinates {
            topic: "fuzz".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: Some(1_700_000_000_000),
        };
        let d = Decoder::new().decode(coords, Some(br#"{"id":"x"}"#), Some(&value));
        println!("{}", consume(&d));
        return;
    }
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium");
    let mut corpus: Vec<(Option<Vec<u8>>, Vec<u8>)> = Vec::new();
    for f in [
        "bookstore-defaults.ndjson",
        "bookstore-seed.ndjson",
        "zoo-defaults.ndjson",
        "zoo-seed.ndjson",
    ] {
        let text = std::fs::read_to_string(fixtures.join(f)).expect("fixtures");
        for line in text.lines() {
            let rec: Value = serde_json::from_str(line).expect("fixture line");
            if let Some(v) = rec["value"].as_str() {
                corpus.push((
                    rec["key"].as_str().map(|k| k.as_bytes().to_vec()),
                    v.as_bytes().to_vec(),
                ));
            }
        }
    }
    assert!(!corpus.is_empty());
    // Panics are caught and reported per input; keep the default hook from printing each one.
    std::panic::set_hook(Box::new(|_| {}));

    let mut rng = Rng(seed | 1);
    let mut decoder = Decoder::new();
    let (mut runs, mut changes, mut skips, mut rejects, mut crashes) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    while Instant::now() < deadline {
        for _ in 0..256 {
            let (key, value) = corpus[rng.below(corpus.len())].clone();
            let mut value = value;
            if rng.below(2) == 0 {
                if let Ok(mut v) = serde_json::from_slice::<Value>(&value) {
                    for _ in 0..=rng.below(4) {
                        mutate_json(&mut v, &mut rng, 0);
                    }
                    value = serde_json::to_vec(&v).expect("serializes");
                }
            } else {
                let other = corpus[rng.below(corpus.len())].1.clone();
                for _ in 0..=rng.below(3) {
                    mutate_bytes(&mut value, &mut rng, &other);
                }
            }
            let key = if rng.below(8) == 0 { None } else { key };
            let coords = KafkaCoordinates {
                topic: "fuzz".into(),
                partition: 0,
                offset: runs as i64,
                timestamp_ms: Some(1_700_000_000_000),
            };
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let d = decoder.decode(coords, key.as_deref(), Some(&value));
                consume(&d)
            }));
            runs += 1;
            match outcome {
                Ok("change") => changes += 1,
                Ok("skip") => skips += 1,
                Ok(_) => rejects += 1,
                Err(_) => {
                    crashes += 1;
                    std::fs::create_dir_all("fuzz-crashes").expect("crash dir");
                    let path = format!("fuzz-crashes/crash-{runs}.json");
                    std::fs::write(&path, &value).expect("write crash");
                    eprintln!("PANIC on input saved to {path}");
                    decoder = Decoder::new();
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fuzzed {runs} inputs in {secs:.0}s ({:.0}/s): {changes} changes, {skips} skips, {rejects} rejects, {crashes} panics",
        runs as f64 / secs
    );
    if crashes > 0 {
        std::process::exit(1);
    }
}
