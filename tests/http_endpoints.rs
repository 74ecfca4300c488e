//! `/healthz`, `/readyz` and `/metrics` on a running pod.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn probes_and_metrics_are_served() {
    run_test(async {
        let prefix = unique("http").replace('_', "-");
        let mut records = load_fixture("bookstore-seed.ndjson");
        retopic(&mut records, &prefix);
        produce(&records).await;
        let db = fresh_db("http").await;
        let port = 20000 + (std::process::id() % 10000);
        let addr = format!("127.0.0.1:{port}");
        let lake = LakeTarget::local("http");
        let pod = Pod::start(config(
            &db,
            &prefix,
            &lake,
            &[("CDC_LAKE__HTTP__LISTEN", addr.as_str())],
        ));
        let client = pg(&db).await;
        wait_raw_rows(
            &client,
            records.len() as i64,
            "samples ingested",
            Duration::from_secs(60),
        )
        .await;

        let a = addr.clone();
        let (health, ready) = tokio::task::spawn_blocking(move || {
            (http_get(&a, "/healthz"), http_get(&a, "/readyz"))
        })
        .await
        .unwrap();
        assert_eq!(health.0, 200);
        assert_eq!(ready, (200, "ready\n".to_string()));
        // Commits follow the lake's roll interval, so wait for the full set rather than race it.
        let wanted = [
            "cdc_lake_records_consumed_total",
            "cdc_lake_records_written_total{sink=\"raw\"}",
            "cdc_lake_records_written_total{sink=\"state\"}",
            "cdc_lake_records_written_total{sink=\"lake\"}",
            "cdc_lake_batch_duration_seconds_bucket",
            "cdc_lake_committed_offset",
            "cdc_lake_ready 1",
        ];
        wait_until("every metric on /metrics", Duration::from_secs(15), || {
            let a = addr.clone();
            async move {
                let (status, body) = tokio::task::spawn_blocking(move || http_get(&a, "/metrics"))
                    .await
                    .unwrap();
                status == 200 && wanted.iter().all(|name| body.contains(name))
            }
        })
        .await;
        // Lag per partition comes from librdkafka's statistics, emitted every 5 s.
        wait_until("lag per partition", Duration::from_secs(15), || {
            let (a, p) = (addr.clone(), prefix.clone());
            async move {
                tokio::task::spawn_blocking(move || http_get(&a, "/metrics").1)
                    .await
                    .unwrap()
                    .lines()
                    .any(|l| l.starts_with("cdc_lake_consumer_lag{") && l.contains(&p))
            }
        })
        .await;
        pod.stop().await;
    });
}
