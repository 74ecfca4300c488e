//! Filters on real Debezium changes (tests/fixtures/debezium, captured from Debezium 3.6.3):
//! each operator and combinator, and the type edge cases (decimals, nulls, timestamps, Unicode).

use std::sync::Arc;

use super::{Routes, Verdict};
use crate::domain::KafkaCoordinates;
use crate::envelope::{ChangeEvent, Decoded, Decoder};

/// The changes of a captured sample, in file order.
fn sample(name: &str) -> Vec<Arc<ChangeEvent>> {
    let path = format!(
        "{}/tests/fixtures/debezium/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let mut decoder = Decoder::new();
    text.lines()
        .filter_map(|line| {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            let coords = KafkaCoordinates {
                topic: r["topic"].as_str().unwrap().into(),
                partition: r["partition"].as_i64().unwrap() as i32,
                offset: r["offset"].as_i64().unwrap(),
                timestamp_ms: None,
            };
            match decoder.decode(
                coords,
                r["key"].as_str().map(str::as_bytes),
                r["value"].as_str().map(str::as_bytes),
            ) {
                Decoded::Change(e) => Some(e),
                _ => None,
            }
        })
        .collect()
}

/// One change made by hand, schemaless (as the seeds' connector settings send them).
fn schemaless(table: &str, op: &str, after: serde_json::Value) -> Arc<ChangeEvent> {
    let value = serde_json::json!({
        "before": null, "after": after, "op": op, "ts_ms": 1,
        "source": {"connector": "postgresql", "name": "t", "db": "db", "schema": "public",
                   "table": table, "lsn": 10, "ts_ms": 1, "txId": 7, "snapshot": "false"},
    });
    let coords = KafkaCoordinates {
        topic: format!("t.public.{table}"),
        partition: 0,
        offset: 0,
        timestamp_ms: None,
    };
    match Decoder::new().decode(
        coords,
        Some(b"{\"id\":1}"),
        Some(value.to_string().as_bytes()),
    ) {
        Decoded::Change(e) => e,
        other => panic!("not a change: {other:?}"),
    }
}

/// The verdict of a one-filter file whose `when` is `when` (YAML flow syntax).
fn verdict(when: &str, e: &ChangeEvent) -> Verdict {
    let yaml = format!("filters:\n  - id: f\n    consumer: c\n    topic: out\n    when: {when}\n");
    let routes = Routes::parse("routes.yaml", &yaml).unwrap_or_else(|e| panic!("{when}: {e:?}"));
    routes.verdicts(e).remove(0)
}

fn routed(when: &str, e: &ChangeEvent) -> bool {
    match verdict(when, e) {
        Verdict::Routed => true,
        Verdict::Skipped => false,
        Verdict::Error(reason) => panic!("{when}: {reason}"),
    }
}

/// The cancelled order of the defaults sample: total numeric(10,2) 14.25 as base64 bytes,
/// created_at MicroTimestamp 2024-03-03 00:00:00.
fn cancelled_order() -> Arc<ChangeEvent> {
    sample("bookstore-defaults.ndjson")
        .into_iter()
        .find(|e| {
            e.after
                .as_ref()
                .is_some_and(|a| a.get("status").is_some_and(|s| s == "CANCELLED"))
        })
        .expect("the sample has a cancelled order")
}

#[test]
fn every_operator_on_typed_debezium_columns() {
    let e = cancelled_order();
    assert!(
        e.schema.declared,
        "the defaults sample carries Connect schemas"
    );
    for (when, want) in [
        ("{field: after.status, equals: CANCELLED}", true),
        ("{field: after.status, equals: cancelled}", false),
        ("{field: after.status, in: [SHIPPED, CANCELLED]}", true),
        ("{field: after.status, notIn: [SHIPPED, CANCELLED]}", false),
        ("{field: after.status, notIn: [SHIPPED]}", true),
        // total is 14.25, sent as base64 two's-complement bytes with scale 2.
        ("{field: after.total, equals: 14.25}", true),
        ("{field: after.total, equals: '14.250'}", true),
        ("{field: after.total, greaterThan: 14.24}", true),
        ("{field: after.total, greaterThan: 14.25}", false),
        ("{field: after.total, greaterThanOrEqual: 14.25}", true),
        ("{field: after.total, lessThan: 14.26}", true),
        ("{field: after.total, lessThanOrEqual: 14.249}", false),
        ("{field: after.total, between: [14.25, 14.25]}", true),
        ("{field: after.total, between: [1, 14]}", false),
        // created_at is a MicroTimestamp: 2024-03-03 00:00:00 in epoch microseconds.
        ("{field: after.created_at, equals: '2024-03-03'}", true),
        (
            "{field: after.created_at, greaterThan: '2024-03-02T23:59:59.999999Z'}",
            true,
        ),
        (
            "{field: after.created_at, lessThan: '2024-03-03T00:00:00.000001'}",
            true,
        ),
        (
            "{field: after.created_at, between: ['2024-03-01', '2024-03-31']}",
            true,
        ),
        (
            "{field: after.user_id, matches: '^keycloak-user-\\d+$'}",
            true,
        ),
        ("{field: after.user_id, matches: 'admin'}", false),
        ("{field: before.status, isNull: true}", true),
        ("{field: after.status, isNull: true}", false),
        ("{field: after.status, isNotNull: true}", true),
        ("{field: op, equals: c}", true),
        ("{field: op, in: [u, d]}", false),
        ("{field: table, equals: public.orders}", true),
        ("{field: source.db, equals: ecomdb}", true),
        ("{field: source.snapshot, equals: 'false'}", true),
        ("{field: source.lsn, greaterThan: 0}", true),
    ] {
        assert_eq!(routed(when, &e), want, "{when}");
    }
}

#[test]
fn combinators_nest_to_any_depth_with_sql_three_valued_logic() {
    let e = cancelled_order();
    let yes = "{field: op, equals: c}";
    let no = "{field: op, equals: d}";
    // A comparison with a null is unknown: neither it nor its negation routes.
    let unknown = "{field: before.total, greaterThan: 1}";
    for (when, want) in [
        (format!("{{and: [{yes}, {yes}]}}"), true),
        (format!("{{and: [{yes}, {no}]}}"), false),
        (format!("{{or: [{no}, {yes}]}}"), true),
        (format!("{{or: [{no}, {no}]}}"), false),
        (format!("{{not: {no}}}"), true),
        (format!("{{not: {yes}}}"), false),
        (unknown.to_string(), false),
        (format!("{{not: {unknown}}}"), false),
        (format!("{{or: [{unknown}, {yes}]}}"), true),
        (format!("{{and: [{unknown}, {yes}]}}"), false),
        (format!("{{not: {{and: [{unknown}, {no}]}}}}"), true),
        (
            format!("{{and: [{yes}, {{or: [{no}, {{not: {{or: [{no}, {{and: [{no}]}}]}}}}]}}]}}"),
            true,
        ),
    ] {
        assert_eq!(routed(&when, &e), want, "{when}");
    }
}

#[test]
fn type_edge_cases_are_errors_or_exact_never_guesses() {
    let e = cancelled_order();
    // Text compared with a number: a definition error, reported, never a numeric guess.
    let v = verdict("{field: after.status, greaterThan: 10}", &e);
    assert!(
        matches!(&v, Verdict::Error(r) if r.contains("text") && r.contains("number")),
        "{v:?}"
    );
    // A column the table does not have, with its schema known.
    let v = verdict("{field: after.totl, equals: 1}", &e);
    assert!(
        matches!(&v, Verdict::Error(r) if r.contains("no column \"totl\"")),
        "{v:?}"
    );
    // A time column against something that is not a time.
    let v = verdict("{field: after.created_at, greaterThan: 'last week'}", &e);
    assert!(matches!(v, Verdict::Error(_)), "{v:?}");

    // Schemaless (the seeds' settings): numbers are JSON numbers, compared exactly.
    let wide = schemaless(
        "orders",
        "c",
        serde_json::json!({"id": 1, "total": 100.10, "big": 12345678901234567890u64, "name": "Zoë 東京", "note": null}),
    );
    assert!(!routed("{field: after.total, greaterThan: 100.1}", &wide));
    assert!(routed("{field: after.total, equals: '100.100'}", &wide));
    assert!(routed(
        "{field: after.big, greaterThan: 12345678901234567889}",
        &wide
    ));
    assert!(!routed(
        "{field: after.big, greaterThan: 12345678901234567890}",
        &wide
    ));
    // Unicode regexes match characters, not bytes.
    assert!(routed(
        "{field: after.name, matches: '^Zo\\p{L} \\p{Han}{2}$'}",
        &wide
    ));
    assert!(routed("{field: after.name, matches: '^.{3} '}", &wide));
    assert!(routed("{field: after.note, isNull: true}", &wide));
    assert!(!routed("{field: after.note, equals: x}", &wide));
    assert!(!routed("{field: after.note, notIn: [x]}", &wide));
    // A column a schemaless row does not carry is null, not an error (its schema is unknown).
    assert!(routed("{field: after.missing, isNull: true}", &wide));
}

#[test]
fn toast_placeholders_are_unknown_for_every_operator() {
    let e = schemaless(
        "books",
        "u",
        serde_json::json!({"id": 1, "description": "__debezium_unavailable_value"}),
    );
    for when in [
        "{field: after.description, isNull: true}",
        "{field: after.description, isNotNull: true}",
        "{field: after.description, equals: x}",
    ] {
        assert!(!routed(when, &e), "{when}");
    }
}

#[test]
fn selection_by_table_topic_and_operation() {
    let changes = sample("bookstore-seed.ndjson");
    let yaml = "filters:
  - id: orders-any
    consumer: a
    tables: [public.orders]
    topic: o
  - id: by-regex
    consumer: b
    tables: ['^public\\.(orders|order_items)$']
    ops: [c]
    topic: o
  - id: by-topic
    consumer: c
    topics: [inventory-connector.public.inventory]
    ops: [d]
    topic: o
";
    let routes = Routes::parse("r.yaml", yaml).unwrap();
    let count = |id: usize| {
        changes
            .iter()
            .filter(|e| routes.verdicts(e)[id] == Verdict::Routed)
            .count()
    };
    let orders = changes.iter().filter(|e| e.table.table == "orders").count();
    let created = changes
        .iter()
        .filter(|e| {
            ["orders", "order_items"].contains(&e.table.table.as_str()) && e.op.code() == "c"
        })
        .count();
    let inventory_deletes = changes
        .iter()
        .filter(|e| e.coords.topic == "inventory-connector.public.inventory" && e.op.code() == "d")
        .count();
    assert!(orders > 0 && created > 0 && inventory_deletes > 0);
    assert_eq!(
        (count(0), count(1), count(2)),
        (orders, created, inventory_deletes)
    );
}

#[test]
fn mistakes_are_reported_with_file_line_and_filter() {
    let text = "filters:
  - id: ok
    consumer: a
    topic: fine
  - id: typo
    consumer: a
    topic: out
    when:
      and:
        - {field: after.total, greaterThen: 1}
  - id: arity
    consumer: a
    topic: out
    when: {field: after.total, between: [1]}
  - id: regex
    consumer: a
    topic: out
    when: {field: after.name, matches: '(unclosed'}
  - id: badtopic
    consumer: a
    topic: 'no spaces allowed'
  - id: ops
    consumer: a
    topic: out
    ops: [c, x]
  - id: field
    consumer: a
    topic: out
    when: {field: aftr.total, equals: 1}
  - id: ok
    consumer: a
    topic: dup
";
    let errors = Routes::parse("routes.yaml", text).unwrap_err();
    let got: Vec<(usize, String, String)> = errors
        .iter()
        .map(|e| (e.line, e.filter.clone().unwrap_or_default(), e.to_string()))
        .collect();
    let expect = [
        (10, "typo", "unknown operator \"greaterThen\""),
        (14, "arity", "`between` takes exactly 2 values, found 1"),
        (18, "regex", "bad regular expression"),
        (21, "badtopic", "not a valid Kafka topic name"),
        (25, "ops", "unknown operation \"x\""),
        (29, "field", "unknown field \"aftr.total\""),
        (30, "ok", "the id is used by an earlier filter"),
    ];
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    for ((line, filter, message), (want_line, want_filter, want_text)) in got.iter().zip(expect) {
        assert_eq!(
            (*line, filter.as_str()),
            (want_line, want_filter),
            "{message}"
        );
        assert!(
            message.starts_with(&format!(
                "routes.yaml:{want_line}: filter \"{want_filter}\""
            )),
            "{message}"
        );
        assert!(message.contains(want_text), "{message}");
    }
    // Syntax errors carry the parser's line.
    let err =
        Routes::parse("r.yaml", "filters:\n  - id: a\n    consumer: [unclosed\n").unwrap_err();
    assert_eq!(err[0].line, 3, "{err:?}");
    // Unknown keys are mistakes too (a misspelt `when` would route everything).
    let err = Routes::parse(
        "r.yaml",
        "filters:\n  - id: a\n    consumer: b\n    topic: t\n    wehn: {}\n",
    )
    .unwrap_err();
    assert!(err[0].message.contains("unknown field `wehn`"), "{err:?}");
}

#[test]
fn schema_checks_find_columns_and_types_that_cannot_fit() {
    let e = cancelled_order();
    let yaml = "filters:
  - id: f
    consumer: c
    topic: out
    when:
      or:
        - {field: after.totl, equals: 1}
        - {field: after.status, greaterThan: 5}
        - {field: after.total, greaterThan: 5}
        - {field: after.created_at, lessThan: '2026-01-01'}
";
    let routes = Routes::parse("r.yaml", yaml).unwrap();
    let problems = routes.filters[0].check_schema("public.orders", &e.schema);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("no column \"totl\""));
    assert!(problems[1].contains("after.status") && problems[1].contains("number"));
}

#[test]
fn routed_records_carry_filter_metadata_and_their_source() {
    let e = cancelled_order();
    let yaml = "filters:
  - id: env
    consumer: finance
    topic: a
  - id: img
    consumer: ops
    topic: b
    output: after
";
    let routes = Routes::parse("r.yaml", yaml).unwrap();
    let at = chrono::DateTime::parse_from_rfc3339("2026-12-05T10:00:00Z")
        .unwrap()
        .to_utc();
    let env: serde_json::Value =
        serde_json::from_slice(&super::output::value(&routes.filters[0], &e, at).unwrap()).unwrap();
    // The envelope as received (the payload of `{schema, payload}`), plus filterMetadata.
    let received: serde_json::Value = serde_json::from_str(&e.raw_value).unwrap();
    for k in ["before", "after", "source", "op", "ts_ms"] {
        assert_eq!(env[k], received["payload"][k], "{k}");
    }
    assert_eq!(
        env["filterMetadata"],
        serde_json::json!({"filterId": "env", "consumerId": "finance", "filteredAt": "2026-12-05T10:00:00.000Z"})
    );
    let img: serde_json::Value =
        serde_json::from_slice(&super::output::value(&routes.filters[1], &e, at).unwrap()).unwrap();
    assert_eq!(img["status"], "CANCELLED");
    assert_eq!(img["total"], received["payload"]["after"]["total"]);
    assert_eq!(
        (img["__op"].as_str(), img["__deleted"].as_str()),
        (Some("c"), Some("false"))
    );
    assert_eq!(img["filterMetadata"]["filterId"], "img");
    let headers = super::output::headers(&e, "env");
    assert_eq!(headers[0], ("cdc.source.topic", e.coords.topic.clone()));
    assert_eq!(
        headers[2],
        ("cdc.source.offset", e.coords.offset.to_string())
    );
    assert_eq!(
        super::output::key(&e),
        e.raw_key.as_deref().map(str::as_bytes)
    );
}

#[test]
fn flink_sql_says_the_same_condition() {
    let yaml = "filters:
  - id: cancelled-over-100
    consumer: finance
    tables: [public.orders]
    ops: [c, u]
    when:
      and:
        - {field: after.status, in: [CANCELLED, 'it''s']}
        - {field: after.total, greaterThan: 100.00}
        - {not: {field: after.note, isNull: true}}
    topic: filtered-cancellations
";
    let routes = Routes::parse("r.yaml", yaml).unwrap();
    let sql = super::flink_sql::filter_sql(&routes.filters[0]).unwrap();
    assert!(
        sql.contains("INSERT INTO `filtered-cancellations`"),
        "{sql}"
    );
    assert!(sql.contains("FROM `public.orders`"), "{sql}");
    assert!(
        sql.contains("`op_type` IN ('INSERT', 'UPDATE_AFTER')"),
        "{sql}"
    );
    assert!(
        sql.contains(
            "(`status` IN ('CANCELLED', 'it''s') AND `total` > 100.0 AND NOT `note` IS NULL)"
        ),
        "{sql}"
    );
}

/// The examples in docs/routing.md are valid filter files (the docs match the code).
#[test]
fn the_documented_examples_are_valid() {
    let doc =
        std::fs::read_to_string(format!("{}/docs/routing.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let blocks: Vec<&str> = doc
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(!blocks.is_empty());
    for block in blocks {
        let routes =
            Routes::parse("docs/routing.md", block).unwrap_or_else(|e| panic!("{e:?}\n{block}"));
        assert!(!routes.filters.is_empty());
    }
}
