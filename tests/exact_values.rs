//! Values stay exactly what the source sent (issue 14), through the real broker into real
//! PostgreSQL and the lake:
//! - schemaless integers of any size keep every digit in the raw log, the mirror (`numeric`
//!   once they pass `bigint`, widening an existing column) and the lake (decimal, or text past
//!   decimal256), and keys that differ in the last digit stay two rows; floats stay floats;
//! - JSON documents nest as deep as jsonb takes, and a `io.debezium.data.Json` document is
//!   stored as the document, not as a string; deeper records are rejected with the reason.
//!
//! The oracle is the test's own input (the values it produced), compared in PostgreSQL as
//! jsonb/numeric and, for the lake, through pyarrow (tests/lake_check.py).
mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio_postgres::Client;

const BIG: &str = "123456789012345678901234567890";
const BIG_NEXT: &str = "123456789012345678901234567891";
/// 80 digits: past decimal256's 76.
const HUGE: &str =
    "12345678901234567890123456789012345678901234567890123456789012345678901234567890";

fn envelope(prefix: &str, table: &str, after: &str, lsn: i64) -> String {
    format!(
        r#"{{"before":null,"after":{after},"source":{{"name":"{prefix}","ts_ms":1795239028962,"snapshot":"false","db":"shop","sequence":"[\"{lsn}\",\"{lsn}\"]","schema":"public","table":"{table}","txId":1,"lsn":{lsn}}},"op":"c","ts_ms":1795239029422}}"#
    )
}

fn record(topic: &str, key: &str, value: String) -> Fixture {
    Fixture {
        topic: topic.into(),
        partition: 0,
        offset: 0,
        key: Some(key.into()),
        value: Some(value),
    }
}

/// Waits for the raw log's and the state sink's checkpoints to pass `n` records of `topic`.
async fn wait_checkpointed(sink: &Client, topic: &str, n: usize) {
    let done = format!(
        "SELECT count(*) FROM cdc_lake.checkpoints WHERE kafka_topic = '{topic}' AND next_offset = {n}"
    );
    wait_until(
        &format!("the raw and state checkpoints of {topic} at {n}"),
        Duration::from_secs(60),
        || async { count(sink, &done).await == 2 },
    )
    .await;
}

async fn column_type(c: &Client, table: &str, column: &str) -> String {
    c.query_one(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
          WHERE attrelid = to_regclass($1) AND attname = $2",
        &[&table, &column],
    )
    .await
    .unwrap_or_else(|e| panic!("type of {table}.{column}: {e}"))
    .get(0)
}

async fn texts(c: &Client, sql: &str) -> Vec<String> {
    c.query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The lake as Delta tables (the default): integers past 38 digits are exact text, as Delta
/// holds no decimal256.
#[test]
fn integers_of_any_size_keep_every_digit() {
    run_test(integers_keep_every_digit("delta", "string"));
}

/// The plain Parquet lake: decimal256 for integers up to 76 digits, exact text beyond.
#[test]
fn integers_of_any_size_keep_every_digit_in_the_plain_parquet_lake() {
    run_test(integers_keep_every_digit("parquet", "decimal256(76, 0)"));
}

/// Runs the pod with `lake.table_format = format`; `wide_lake_type` is the lake's type of the
/// integers that pass `bigint` but fit 76 digits.
async fn integers_keep_every_digit(format: &str, wide_lake_type: &str) {
    let prefix = unique("bigint").replace('_', "-");
    let topic = format!("{prefix}.public.numbers");
    let keys_topic = format!("{prefix}.public.big_keys");
    let records = vec![
        // A small first value makes the mirror column bigint; the next one widens it.
        record(
            &topic,
            r#"{"id":1}"#,
            envelope(&prefix, "numbers", r#"{"id":1,"n":5,"f":1.5}"#, 100),
        ),
        record(
            &topic,
            r#"{"id":2}"#,
            envelope(
                &prefix,
                "numbers",
                &format!(r#"{{"id":2,"n":{BIG},"f":-1e300}}"#),
                101,
            ),
        ),
        record(
            &keys_topic,
            &format!(r#"{{"k":{BIG}}}"#),
            envelope(
                &prefix,
                "big_keys",
                &format!(r#"{{"k":{BIG},"v":"first","h":{HUGE}}}"#),
                102,
            ),
        ),
        record(
            &keys_topic,
            &format!(r#"{{"k":{BIG_NEXT}}}"#),
            envelope(
                &prefix,
                "big_keys",
                &format!(r#"{{"k":{BIG_NEXT},"v":"second","h":-{HUGE}}}"#),
                103,
            ),
        ),
    ];
    produce(&records).await;
    let db = fresh_db("bigint").await;
    let lake = LakeTarget::local("bigint");
    let pod = Pod::start(config(
        &db,
        &prefix,
        &lake,
        &[("CDC_LAKE__LAKE__TABLE_FORMAT", format)],
    ));
    let sink = pg(&db).await;
    wait_checkpointed(&sink, &topic, 2).await;
    wait_checkpointed(&sink, &keys_topic, 2).await;
    pod.stop().await;

    // Raw log: the digits as sent, as jsonb numbers.
    assert_eq!(
            texts(
                &sink,
                "SELECT (after_data->'n')::text || ' ' || jsonb_typeof(after_data->'n')
                   FROM cdc_raw.cdc_events WHERE source_table = 'public.numbers' ORDER BY kafka_offset"
            )
            .await,
            vec!["5 number".to_string(), format!("{BIG} number")]
        );
    assert_eq!(
            texts(
                &sink,
                "SELECT (after_data->'h')::text FROM cdc_raw.cdc_events WHERE source_table = 'public.big_keys' ORDER BY kafka_offset"
            )
            .await,
            vec![HUGE.to_string(), format!("-{HUGE}")]
        );

    // Mirror: numeric where bigint cannot hold the value (widened), floats stay floats.
    assert_eq!(
        column_type(&sink, "cdc_processed.numbers", "n").await,
        "numeric"
    );
    assert_eq!(
        column_type(&sink, "cdc_processed.numbers", "f").await,
        "double precision"
    );
    assert_eq!(
            texts(&sink, "SELECT n::text || ' ' || (f = -1e300 OR f = 1.5)::text FROM cdc_processed.numbers ORDER BY id").await,
            vec!["5 true".to_string(), format!("{BIG} true")]
        );
    assert_eq!(
        column_type(&sink, "cdc_processed.big_keys", "k").await,
        "numeric"
    );
    assert_eq!(
        column_type(&sink, "cdc_processed.big_keys", "h").await,
        "numeric"
    );
    assert_eq!(
        texts(
            &sink,
            "SELECT k::text || ' ' || v || ' ' || h::text FROM cdc_processed.big_keys ORDER BY k"
        )
        .await,
        vec![
            format!("{BIG} first {HUGE}"),
            format!("{BIG_NEXT} second -{HUGE}")
        ],
        "keys that differ in the last digit are two rows"
    );

    // Lake: the wide integers in `wide_lake_type`, exact text past 76 digits.
    let report = lake.check();
    let types = &report["types"];
    assert_eq!(types["public.numbers"]["n"], wide_lake_type, "{format}");
    assert_eq!(types["public.numbers"]["f"], "double");
    assert_eq!(types["public.big_keys"]["k"], wide_lake_type, "{format}");
    assert_eq!(types["public.big_keys"]["h"], "string");
    let keys: Vec<String> = report["state"]["table=public.big_keys"]
        .as_object()
        .unwrap()
        .values()
        .map(|a| format!("{} {}", a["k"].as_str().unwrap(), a["h"].as_str().unwrap()))
        .collect();
    let mut keys = keys;
    keys.sort();
    assert_eq!(
        keys,
        vec![format!("{BIG} {HUGE}"), format!("{BIG_NEXT} -{HUGE}")]
    );
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// A captured Debezium record (`{schema, payload}`, Debezium's defaults) of the type zoo,
/// reduced to `id` and the jsonb column, as table `deep_connect` with the document `doc`.
fn connect_json_record(prefix: &str, id: i64, doc: &str) -> String {
    let zoo = load_fixture("zoo-defaults.ndjson");
    let captured = zoo
        .iter()
        .filter_map(|r| r.value.as_deref())
        .find(|v| v.contains("io.debezium.data.Json") && v.contains(r#""op":"c""#))
        .expect("a captured insert with a Json column");
    let mut v: Value = serde_json::from_str(captured).unwrap();
    for image in v["schema"]["fields"].as_array_mut().unwrap() {
        if image["field"] == "before" || image["field"] == "after" {
            image["fields"]
                .as_array_mut()
                .unwrap()
                .retain(|f| f["field"] == "id" || f["field"] == "c_jsonb");
        }
    }
    let payload = &mut v["payload"];
    payload["after"] = serde_json::json!({ "id": id, "c_jsonb": doc });
    payload["source"]["name"] = prefix.into();
    payload["source"]["table"] = "deep_connect".into();
    v.to_string()
}

async fn deep_documents() {
    let prefix = unique("deep").replace('_', "-");
    let topic = format!("{prefix}.public.deep_docs");
    let connect_topic = format!("{prefix}.public.deep_connect");
    let limit = cdc_lake::envelope::json::MAX_DEPTH;
    let depths = [200usize, 5_000];
    let mut records: Vec<Fixture> = depths
        .iter()
        .enumerate()
        .map(|(i, d)| {
            record(
                &topic,
                &format!(r#"{{"id":{i}}}"#),
                envelope(
                    &prefix,
                    "deep_docs",
                    &format!(r#"{{"id":{i},"doc":{}}}"#, nested(*d)),
                    100 + i as i64,
                ),
            )
        })
        .collect();
    // Deeper than cdc-lake parses: rejected at decode with the reason (the envelope and `after`
    // add two levels).
    records.push(record(
        &topic,
        r#"{"id":9}"#,
        envelope(
            &prefix,
            "deep_docs",
            &format!(r#"{{"id":9,"doc":{}}}"#, nested(limit + 10)),
            109,
        ),
    ));
    // The stream continues after it.
    records.push(record(
        &topic,
        r#"{"id":3}"#,
        envelope(&prefix, "deep_docs", r#"{"id":3,"doc":[1]}"#, 110),
    ));
    records.push(record(
        &connect_topic,
        r#"{"schema":{"type":"struct","fields":[{"type":"int32","optional":false,"field":"id"}],"optional":false},"payload":{"id":1}}"#,
        connect_json_record(&prefix, 1, &nested(200)),
    ));
    produce(&records).await;
    let db = fresh_db("deep").await;
    let lake = LakeTarget::local("deep");
    let pod = Pod::start(config(&db, &prefix, &lake, &[]));
    let sink = pg(&db).await;
    wait_checkpointed(&sink, &topic, 4).await;
    wait_checkpointed(&sink, &connect_topic, 1).await;
    pod.stop().await;

    for (i, d) in depths.iter().enumerate() {
        let expected = nested(*d);
        let same = |sql: String| {
            let sink = &sink;
            let expected = expected.clone();
            async move {
                sink.query_one(&sql, &[&expected])
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
                    .get::<_, bool>(0)
            }
        };
        assert!(
            same(format!("SELECT after_data->'doc' = $1::text::jsonb FROM cdc_raw.cdc_events WHERE kafka_topic = '{topic}' AND after_data->>'id' = '{i}'")).await,
            "raw log holds the {d}-level document"
        );
        assert!(
            same(format!(
                "SELECT doc = $1::text::jsonb FROM cdc_processed.deep_docs WHERE id = {i}"
            ))
            .await,
            "mirror holds the {d}-level document"
        );
    }
    assert_eq!(
        column_type(&sink, "cdc_processed.deep_docs", "doc").await,
        "jsonb"
    );
    let reason = texts(
        &sink,
        &format!(
            "SELECT stage || ': ' || reason FROM cdc_raw.cdc_rejects WHERE kafka_topic = '{topic}'"
        ),
    )
    .await;
    assert_eq!(reason.len(), 1, "{reason:?}");
    assert!(
        reason[0].starts_with("decode: ")
            && reason[0].contains(&format!(
                "{} levels deep, more than the {limit}",
                limit + 12
            )),
        "{reason:?}"
    );
    assert_eq!(
        count(&sink, "SELECT count(*) FROM cdc_processed.deep_docs").await,
        3
    );

    // io.debezium.data.Json: the document, not a string holding it.
    let row = sink
        .query_one(
            "SELECT jsonb_typeof(c_jsonb), c_jsonb = $1::text::jsonb FROM cdc_processed.deep_connect WHERE id = 1",
            &[&nested(200)],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "array");
    assert!(row.get::<_, bool>(1));

    // The lake keeps the documents exactly (as JSON text).
    let report = lake.check();
    let state = report["state"]["table=public.deep_docs"]
        .as_object()
        .unwrap();
    for (i, d) in depths.iter().enumerate() {
        let doc = state
            .values()
            .find(|a| a["id"] == i as i64)
            .map(|a| a["doc"].as_str().unwrap().to_string())
            .unwrap();
        assert_eq!(doc, nested(*d), "lake holds the {d}-level document");
    }
}

/// Runs on the runtime the binaries use (cdc_lake::cli::runtime): its threads' stacks are part
/// of what makes deep documents safe.
#[test]
fn json_documents_nest_as_deep_as_jsonb_takes() {
    std::thread::Builder::new()
        .stack_size(cdc_lake::envelope::json::THREAD_STACK_BYTES)
        .spawn(|| cdc_lake::cli::runtime().unwrap().block_on(deep_documents()))
        .unwrap()
        .join()
        .unwrap();
}
