//! The ops dashboard (`deploy/grafana/cdc-lake.json`) against the real `/metrics` of a running
//! pod: every metric a panel queries exists there, and every metric family the pod exports is
//! on a panel. The pod routes (one filter), compacts its lake in the pod, and is sent a record
//! it must reject, so that families that appear only once used are there too.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::Value;

const DASHBOARD: &str = include_str!("../deploy/grafana/cdc-lake.json");

/// The metric names a query uses (`cdc_lake_…` tokens).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("cdc_lake_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

/// The dashboard's queries, after checking the panels are well formed.
fn dashboard_queries() -> Vec<String> {
    let d: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert_eq!(d["uid"], "cdc-lake-ops");
    let panels = d["panels"].as_array().expect("panels");
    let ids: BTreeSet<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let mut queries = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(
            p["description"]
                .as_str()
                .is_some_and(|q| q.ends_with('?') || q.contains("? ")),
            "{title}: the description is the on-call question it answers"
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_i64().unwrap() + g["w"].as_i64().unwrap() <= 24,
            "{title}: fits the grid"
        );
        for t in p["targets"].as_array().expect("targets") {
            queries.push(t["expr"].as_str().expect("a PromQL expr").to_string());
        }
    }
    queries
}

/// Metric families on a `/metrics` page (its `# TYPE` lines) and their kinds.
fn families(page: &str) -> Vec<(String, String)> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_string(), k.to_string()))
        .collect()
}

#[test]
fn every_metric_on_the_dashboard_exists_and_every_metric_is_on_it() {
    run_test(async {
        let prefix = unique("ops").replace('_', "-");
        let mut records = load_fixture("bookstore-seed.ndjson");
        retopic(&mut records, &prefix);
        let topic = records[0].topic.clone();
        produce(&records).await;
        // A record no sink can take: rejected, with a reason.
        produce_bytes(&[BinaryRecord {
            topic,
            partition: 0,
            key: Some(b"{\"id\":1}".to_vec()),
            value: Some(b"not json at all".to_vec()),
        }])
        .await;

        let routes = std::env::temp_dir().join(format!("{prefix}-routes.yaml"));
        std::fs::write(
            &routes,
            format!("filters:\n  - id: orders\n    consumer: ops\n    tables: [orders]\n    topic: {prefix}-orders\n"),
        )
        .unwrap();
        let db = fresh_db("ops").await;
        let port = 21000 + (std::process::id() % 9000);
        let addr = format!("127.0.0.1:{port}");
        let routes_file = routes.to_str().unwrap().to_string();
        let pod = Pod::start(config(
            &db,
            &prefix,
            &LakeTarget::local("ops"),
            &[
                ("CDC_LAKE__HTTP__LISTEN", addr.as_str()),
                ("CDC_LAKE__ROUTES__FILE", routes_file.as_str()),
                ("CDC_LAKE__LAKE__COMPACTION__EVERY", "2s"),
            ],
        ));

        let used: BTreeSet<String> = dashboard_queries()
            .iter()
            .flat_map(|q| metric_names(q))
            .collect();
        assert!(
            used.len() >= 10,
            "the dashboard queries the pod's metrics: {used:?}"
        );
        // Until every family is there (lag comes with librdkafka's statistics every 5 s; the
        // reject and the commits with the first batches), then compare both ways.
        let page = std::cell::RefCell::new(String::new());
        let check = || {
            let exported: Vec<(String, String)> = families(&page.borrow());
            let known = |name: &str| {
                exported.iter().any(|(n, kind)| {
                    n == name
                        || (kind == "histogram"
                            && ["_bucket", "_sum", "_count"]
                                .iter()
                                .any(|s| name.strip_suffix(s) == Some(n.as_str())))
                })
            };
            let missing: Vec<&String> = used.iter().filter(|n| !known(n)).collect();
            let unshown: Vec<&String> = exported
                .iter()
                .map(|(n, _)| n)
                .filter(|n| n.starts_with("cdc_lake_"))
                .filter(|n| {
                    !used
                        .iter()
                        .any(|u| u == *n || u.starts_with(&format!("{n}_")))
                })
                .collect();
            (
                format!("{missing:?}"),
                format!("{unshown:?}"),
                missing.is_empty(),
            )
        };
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let a = addr.clone();
                let fetched = tokio::task::spawn_blocking(move || {
                    std::net::TcpStream::connect(&a)
                        .ok()
                        .map(|_| http_get(&a, "/metrics").1)
                })
                .await
                .unwrap();
                if let Some(body) = fetched {
                    *page.borrow_mut() = body;
                    if check().2 {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await;
        let (missing, unshown, _) = check();
        assert!(
            waited.is_ok(),
            "metrics the dashboard uses that the pod never exported: {missing}"
        );
        assert_eq!(unshown, "[]", "metrics the pod exports that no panel shows");
        pod.stop().await;
    });
}
