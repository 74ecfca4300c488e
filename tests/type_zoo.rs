//! Fidelity: the type zoo (tools/zoo/) captured from real Debezium under Debezium's defaults,
//! under the seeds' settings and under string settings (schemaless, string decimals,
//! adaptive_time_microseconds, hex binary), through the broker into the mirror and the lake.
//! Every column of every row is compared with the source by tools/zoo/check.py, which reads the mirror with
//! psycopg2 and the lake with pyarrow. The committed fixtures are checked against the committed
//! source rows; the live tests capture afresh and compare with the live source database.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cdc_lake::replay::{self, SourceKind};
use common::*;
use serde_json::Value;

/// Columns compared per table and row: type_zoo has 30 columns besides the key, 4 rows;
/// zoo_truncated 1 column, 2 rows; zoo_nokey 1 column, 1 row; zoo_json 1 column, 2 rows.
const CELLS: i64 = 30 * 4 + 2 + 1 + 2;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where the zoo's records go: the raw log takes every change, logical message and truncate
/// (the envelopes with an `op`); heartbeats, transaction markers and tombstones are counted
/// skips.
fn stored(records: &[Fixture]) -> usize {
    records
        .iter()
        .filter(|r| r.value.as_deref().is_some_and(|v| v.contains(r#""op":"#)))
        .count()
}

enum Source<'a> {
    Expected,
    Live(&'a str),
}

/// Runs the pod (with `pod_settings`) over the zoo's records, `want` of which reach the raw
/// log, and compares mirror and lake with the source as captured under `format`.
async fn round_trip(
    want: i64,
    prefix: &str,
    format: &str,
    source: Source<'_>,
    pod_settings: &[(&str, &str)],
) {
    let lake = LakeTarget::s3("zoo");
    let db = fresh_db("zoo").await;
    let mut cfg = config(&db, prefix, &lake, pod_settings);
    cfg.state
        .key_columns
        .insert("public.zoo_nokey".into(), vec!["sku".into()]);
    let pod = Pod::start(cfg.clone());
    let client = pg(&db).await;
    wait_raw_rows(
        &client,
        want,
        "every zoo change in the raw log",
        Duration::from_secs(120),
    )
    .await;
    pod.stop().await;

    // Every op reached the raw log.
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

    // The document jsonb cannot hold (U+0000 in a json column). Under the defaults it is
    // typed Json: the mirror (jsonb) rejects that row with the column and the reason, and the
    // raw log keeps the document as sent; the lake keeps it too (compared by check.py).
    // Schemaless, it is plain text everywhere.
    let rejects = client
        .query("SELECT stage, reason FROM cdc_raw.cdc_rejects", &[])
        .await
        .unwrap();
    let raw_doc: String = client
        .query_one(
            "SELECT after_data->>'doc' FROM cdc_raw.cdc_events
              WHERE source_table = 'public.zoo_json' AND after_data->>'id' = '1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(raw_doc, r#"{"nul": "\u0000"}"#);
    let mut skip = vec![];
    if format == "schema" {
        assert_eq!(rejects.len(), 1, "only the U+0000 document is rejected");
        let (stage, reason): (String, String) = (rejects[0].get(0), rejects[0].get(1));
        assert_eq!(stage, "state");
        assert!(
            reason.contains("column doc") && reason.contains("jsonb cannot store"),
            "{reason}"
        );
        skip = vec!["--skip-mirror-row", "zoo_json:1"];
    } else {
        assert_eq!(rejects.len(), 0);
    }

    // Types, not only values: each mirror column's PostgreSQL type and each lake column's
    // Arrow type against what the capture setting declares (values alone passed while floats
    // were stored as text).
    let mirror_types: std::collections::BTreeMap<String, String> = pairs(
        &client,
        "SELECT column_name::text, data_type::text FROM information_schema.columns
              WHERE table_schema = 'cdc_processed' AND table_name = 'type_zoo'",
        &[],
    )
    .await;
    let lake_report = lake.check();
    let lake_types = &lake_report["types"]["public.type_zoo"];
    type Expected<'a> = &'a [(&'a str, &'a str)];
    let (mirror_want, lake_want): (Expected, Expected) = if format == "schema" {
        (
            &[
                ("c_bool", "boolean"),
                ("c_int2", "smallint"),
                ("c_int4", "integer"),
                ("c_int8", "bigint"),
                ("c_float4", "real"),
                ("c_float8", "double precision"),
                ("c_text", "text"),
                ("c_uuid", "uuid"),
                ("c_bytea", "bytea"),
                ("c_date", "date"),
                ("c_timestamptz", "timestamp with time zone"),
                ("c_jsonb", "jsonb"),
            ],
            &[
                ("c_bool", "bool"),
                ("c_int2", "int16"),
                ("c_int4", "int32"),
                ("c_int8", "int64"),
                ("c_float4", "float"),
                ("c_float8", "double"),
                ("c_bytea", "binary"),
                ("c_date", "date32[day]"),
            ],
        )
    } else if format == "strings" {
        // Schemaless with string decimals, microsecond times and hex binary: decimals and bytea
        // are the exact text Debezium sent, dates and times its numbers.
        (
            &[
                ("c_bool", "boolean"),
                ("c_int8", "bigint"),
                ("c_text", "text"),
                ("c_numeric", "text"),
                ("c_numeric_wide", "text"),
                ("c_bytea", "text"),
                ("c_date", "bigint"),
                ("c_time", "bigint"),
                ("c_timestamp", "bigint"),
            ],
            &[
                ("c_bool", "bool"),
                ("c_int8", "int64"),
                ("c_numeric", "string"),
                ("c_bytea", "string"),
                ("c_time", "int64"),
            ],
        )
    } else {
        // Schemaless: inferred from the JSON values (the zoo's float8 column carries NaN and
        // Infinity as strings, so schemaless inference cannot call it a float).
        (
            &[
                ("c_bool", "boolean"),
                ("c_int8", "bigint"),
                ("c_text", "text"),
            ],
            &[("c_bool", "bool"), ("c_int8", "int64")],
        )
    };
    for (column, want) in mirror_want {
        assert_eq!(
            mirror_types.get(*column).map(String::as_str),
            Some(*want),
            "{format}: mirror type of {column}"
        );
    }
    for (column, want) in lake_want {
        assert_eq!(
            lake_types[*column].as_str(),
            Some(*want),
            "{format}: lake type of {column}: {lake_types}"
        );
    }

    // Replaying every type from the raw log and from the lake gives the live mirror again.
    let target = cfg.target("processed").unwrap();
    for kind in [SourceKind::Raw, SourceKind::Lake] {
        let reader = replay::Reader::open(&cfg, kind).await.unwrap();
        let diffs = replay::compare::verify(&cfg, &target, &reader)
            .await
            .unwrap();
        assert!(
            diffs.len() >= 4 && diffs.iter().all(|d| d.is_empty()),
            "{kind:?}: {diffs:?}"
        );
    }

    let mut check = Command::new(python());
    check
        .arg(repo().join("tools/zoo/check.py"))
        .args(["--format", format, "--mirror", &db])
        .args(&skip);
    match source {
        Source::Expected => check.args([
            "--expected",
            &repo()
                .join("tests/fixtures/debezium/zoo-source.json")
                .display()
                .to_string(),
        ]),
        Source::Live(url) => check.args(["--source", url]),
    };
    let LakeTarget::S3 {
        prefix: lake_prefix,
        ..
    } = &lake
    else {
        unreachable!()
    };
    check.args(["--lake-s3", &s3_endpoint(), "cdc-lake", lake_prefix]);
    let out = check.output().expect("run tools/zoo/check.py");
    assert!(
        out.status.success(),
        "check.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["mismatches"].as_array().unwrap().len(),
        0,
        "{}",
        serde_json::to_string_pretty(&report["mismatches"]).unwrap()
    );
    let skipped = (skip.len() / 2) as i64;
    assert_eq!(report["compared"]["mirror"], CELLS - skipped, "{report}");
    assert_eq!(report["compared"]["lake"], CELLS, "{report}");
}

async fn committed_fixture(file: &str, format: &str) {
    let prefix = unique("zoo").replace('_', "-");
    let mut records = load_fixture(file);
    retopic(&mut records, &prefix);
    produce(&records).await;
    round_trip(
        stored(&records) as i64,
        &prefix,
        format,
        Source::Expected,
        &[],
    )
    .await;
}

#[test]
fn committed_capture_under_debezium_defaults_round_trips() {
    run_test(async {
        committed_fixture("zoo-defaults.ndjson", "schema").await;
    });
}

/// The zoo captured by real Debezium with Confluent's Avro converter (Debezium's default type
/// modes) round-trips exactly as its `{schema, payload}` JSON capture does: the same column
/// types and values in mirror and lake, checked against the same source rows.
#[test]
fn committed_avro_capture_round_trips_like_the_json_capture() {
    run_test(async {
        let prefix = unique("zooavro").replace('_', "-");
        let records = committed_avro_capture(&prefix).await;
        produce_bytes(&records).await;
        // The JSON capture of the same workload: how many envelopes carry an op (tests/decode_avro
        // proves both captures decode to the same changes).
        let want = stored(&load_fixture("zoo-defaults.ndjson")) as i64;
        let urls = format!("['{}']", registry_url());
        let avro = [
            ("CDC_LAKE__KAFKA__FORMAT", "avro"),
            ("CDC_LAKE__KAFKA__SCHEMA_REGISTRY__URLS", urls.as_str()),
        ];
        round_trip(want, &prefix, "schema", Source::Expected, &avro).await;
    });
}

#[test]
fn committed_capture_under_string_settings_round_trips() {
    run_test(async {
        committed_fixture("zoo-strings.ndjson", "strings").await;
    });
}

#[test]
fn committed_capture_under_the_seeds_settings_round_trips() {
    run_test(async {
        committed_fixture("zoo-seed.ndjson", "seed").await;
    });
}

/// Captures the zoo afresh with real Debezium (tools/capture-zoo) into its own database and
/// topics, and compares with that live source database.
/// Runs real Debezium over the zoo with `tools/capture-zoo <format>`: the prefix of its topics
/// and the capture it wrote.
fn capture_live(format: &str) -> (String, PathBuf) {
    let prefix = unique(&format!("zoolive{format}"))
        .replace('_', "")
        .to_lowercase();
    let out: PathBuf = std::env::temp_dir().join(format!("{prefix}.ndjson"));
    let status = Command::new(repo().join("tools/capture-zoo"))
        .args([format, &out.display().to_string()])
        .env("ZOO_PREFIX", &prefix)
        .status()
        .expect("run tools/capture-zoo");
    assert!(status.success(), "tools/capture-zoo {format}");
    (prefix, out)
}

async fn live(format: &str) {
    let (prefix, out) = capture_live(format);
    let records = read_fixture(&out);
    let source = format!("{}/{prefix}", source_url().rsplit_once('/').unwrap().0);
    round_trip(
        stored(&records) as i64,
        &prefix,
        format,
        Source::Live(&source),
        &[],
    )
    .await;
    drop_source_db(&prefix).await;
}

/// The changes among the records of an Avro capture (transaction markers, heartbeats and
/// tombstones are counted skips): the records whose value decodes to an envelope with an op.
fn avro_changes(capture: &Path) -> i64 {
    use base64::Engine as _;
    use cdc_lake::envelope::avro::{unframe, WriterSchema};
    let schemas: std::collections::HashMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(capture.with_extension("schemas.json")).unwrap(),
    )
    .unwrap();
    let mut n = 0;
    for line in std::fs::read_to_string(capture).unwrap().lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        let Some(b64) = record["value_base64"].as_str() else {
            continue;
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let (id, datum) = unframe(&bytes).unwrap();
        let writer = WriterSchema::parse(id, &schemas[&id.to_string()]).unwrap();
        if writer
            .decode(datum)
            .unwrap()
            .get("op")
            .is_some_and(|op| !op.is_null())
        {
            n += 1;
        }
    }
    n
}

#[test]
fn live_capture_under_debezium_defaults_round_trips() {
    run_test(async {
        live("schema").await;
    });
}

#[test]
fn live_capture_under_string_settings_round_trips() {
    run_test(async {
        live("strings").await;
    });
}

#[test]
fn live_capture_under_the_seeds_settings_round_trips() {
    run_test(async {
        live("seed").await;
    });
}

#[test]
fn live_capture_in_avro_round_trips() {
    run_test(async {
        // Debezium with Confluent's Avro converter against the registry stand-in; the pod
        // reads the same registry. Oracle: the source database, as for the JSON captures.
        lib_sh("start_registry", &[]);
        let (prefix, out) = capture_live("avro");
        let source = format!("{}/{prefix}", source_url().rsplit_once('/').unwrap().0);
        let urls = format!("['{}']", registry_url());
        let avro = [
            ("CDC_LAKE__KAFKA__FORMAT", "avro"),
            ("CDC_LAKE__KAFKA__SCHEMA_REGISTRY__URLS", urls.as_str()),
        ];
        round_trip(
            avro_changes(&out),
            &prefix,
            "schema",
            Source::Live(&source),
            &avro,
        )
        .await;
        drop_source_db(&prefix).await;
    });
}
