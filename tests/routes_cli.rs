//! `cdc-lake routes check|test|sql` as a team's CI runs them: exit codes and what they print,
//! on the captured Debezium samples. No service is needed.

use std::path::PathBuf;
use std::process::{Command, Output};

fn routes(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdc-lake"))
        .arg("routes")
        .args(args)
        .output()
        .unwrap()
}

fn file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn sample(name: &str) -> String {
    format!(
        "{}/tests/fixtures/debezium/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

const GOOD: &str = "filters:
  - id: cancellations
    consumer: finance
    tables: [public.orders]
    when:
      and:
        - {field: after.status, equals: CANCELLED}
        - {field: after.total, greaterThan: 10}
    topic: filtered-cancellations
  - id: books
    consumer: shop
    tables: [public.books]
    ops: [c, u, r]
    topic: filtered-books
    output: after
";

#[test]
fn check_accepts_a_good_file_and_reports_each_mistake_with_file_and_line() {
    let good = file("good.yaml", GOOD);
    let out = routes(&["check", "--file", good.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 filter(s), all valid"));

    let bad = file(
        "bad.yaml",
        "filters:\n  - id: a\n    consumer: c\n    topic: t\n    when: {field: after.x, greaterThen: 1}\n  - id: b\n    consumer: c\n    topic: t\n    when: {field: after.x, matches: '['}\n",
    );
    let out = routes(&["check", "--file", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let path = bad.display().to_string();
    assert!(
        stderr.contains(&format!(
            "{path}:5: filter \"a\": when.greaterThen: unknown operator"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{path}:9: filter \"b\": when.matches: bad regular expression"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("2 mistake(s)"), "{stderr}");
}

#[test]
fn check_with_a_sample_finds_columns_and_types_that_cannot_fit() {
    let wrong = file(
        "wrong.yaml",
        "filters:\n  - id: w\n    consumer: c\n    tables: [public.orders]\n    topic: t\n    when: {or: [{field: after.totl, equals: 1}, {field: after.status, greaterThan: 3}]}\n",
    );
    let out = routes(&[
        "check",
        "--file",
        wrong.to_str().unwrap(),
        "--sample",
        &sample("bookstore-defaults.ndjson"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has no column \"totl\""), "{stderr}");
    assert!(
        stderr.contains("after.status") && stderr.contains("number"),
        "{stderr}"
    );
    let good = file("good2.yaml", GOOD);
    let out = routes(&[
        "check",
        "--file",
        good.to_str().unwrap(),
        "--sample",
        &sample("bookstore-defaults.ndjson"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn test_prints_where_each_sample_record_goes() {
    let good = file("good3.yaml", GOOD);
    let out = routes(&[
        "test",
        "--file",
        good.to_str().unwrap(),
        "--sample",
        &sample("bookstore-seed.ndjson"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The seed sample's one cancelled order (total 14.25) and its books.
    let cancelled: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("cancellations -> filtered-cancellations"))
        .collect();
    assert_eq!(cancelled.len(), 1, "{stdout}");
    assert!(cancelled[0].contains("public.orders c"), "{stdout}");
    assert!(
        stdout
            .lines()
            .filter(|l| l.contains("books -> filtered-books"))
            .count()
            >= 4,
        "{stdout}"
    );
    assert!(stdout.contains("no match"), "{stdout}");
}

#[test]
fn sql_prints_one_insert_per_filter() {
    let good = file("good4.yaml", GOOD);
    let out = routes(&["sql", "--file", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("INSERT INTO").count(), 2, "{stdout}");
    assert!(
        stdout.contains("WHERE (`status` = 'CANCELLED' AND `total` > 10)"),
        "{stdout}"
    );
}
