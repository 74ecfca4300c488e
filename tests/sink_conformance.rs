//! One conformance suite for every sink (see the contract in `cdc_lake::sink`): idempotent per
//! offset, checkpoints stored with the data, acknowledgements mean durable. The real sinks run
//! against real PostgreSQL and a real S3 API; the in-memory sink runs the same suite.

mod common;

use cdc_lake::batch::Batch;
use cdc_lake::domain::{KafkaCoordinates, TopicPartition};
use cdc_lake::envelope::Decoder;
use cdc_lake::sink::lake::LakeSink;
use cdc_lake::sink::memory::MemorySink;
use cdc_lake::sink::raw::RawSink;
use cdc_lake::sink::state::StateSink;
use cdc_lake::sink::Sink;
use common::*;

fn batch(topic: &str, partition: i32, offsets: std::ops::Range<i64>) -> Batch {
    let mut decoder = Decoder::new();
    let mut b = Batch::default();
    for o in offsets {
        let coords = KafkaCoordinates {
            topic: topic.into(),
            partition,
            offset: o,
            timestamp_ms: Some(1_700_000_000_000),
        };
        let key = format!(r#"{{"id":{}}}"#, o % 7);
        // Every 5th offset is a tombstone and every 9th is malformed: sinks must still
        // account for them in their checkpoints.
        let value = if o % 5 == 4 {
            None
        } else if o % 9 == 8 {
            Some("{oops".to_string())
        } else {
            Some(format!(
                r#"{{"before":null,"after":{{"id":{},"v":{o}}},"source":{{"schema":"public","table":"conf","ts_ms":1700000000000,"lsn":{l},"sequence":"[\"{l}\",\"{l}\"]"}},"op":"c","ts_ms":1}}"#,
                o % 7,
                l = 1000 + o
            ))
        };
        b.records.push(decoder.decode(
            coords,
            Some(key.as_bytes()),
            value.as_deref().map(str::as_bytes),
        ));
    }
    b
}

/// Every sink runs these steps in order, each a named check of one clause of the contract, on
/// one fresh topic with two partitions.
async fn conformance<S: Sink>(mut make: impl FnMut() -> S) {
    let topic = unique("conf").replace('_', "-");
    let (p0, p1) = (
        TopicPartition::new(&topic, 0),
        TopicPartition::new(&topic, 1),
    );
    a_fresh_sink_has_no_checkpoint(&mut make, &[p0.clone(), p1.clone()]).await;
    let b1 = acknowledged_means_durable(&mut make, &topic, &p0, &p1).await;
    a_restarted_sink_reads_its_checkpoints(&mut make, &[(&p0, 10), (&p1, 5)]).await;
    redelivery_stores_nothing_again(&mut make, &b1).await;
    an_overlapping_batch_stores_only_new_offsets(&mut make, &topic, &p0).await;
    revoke_makes_nothing_durable_that_was_not_acknowledged(&mut make, &topic).await;
    a_second_writer_is_fenced(&mut make, &topic).await;
    refuses_a_gap(make, &topic, &p0, 15).await;
}

/// Two instances that both believe they own a partition (the new owner, and an old one that
/// missed its revoke and still holds records) never store an offset twice and never replace
/// what the other stored: the new owner stores 3..12 after the old owner's 0..3, then the old
/// owner writes 3..9 from its stale view. The checkpoint ends at 12, and what the suite's
/// final check reads from storage (lake: every object listed, each offset once) holds.
async fn a_second_writer_is_fenced<S: Sink>(make: &mut impl FnMut() -> S, topic: &str) {
    let tp = TopicPartition::new(topic, 3);
    let partitions = std::slice::from_ref(&tp);
    let mut old_owner = make();
    old_owner.checkpoints(partitions).await.unwrap();
    old_owner.write(&batch(topic, 3, 0..3)).await.unwrap();
    old_owner.flush(true).await.unwrap();

    let mut new_owner = make();
    let start = new_owner.checkpoints(partitions).await.unwrap();
    assert_eq!(
        start.get(&tp),
        Some(&3),
        "{}: the new owner starts at 3",
        new_owner.name()
    );
    new_owner.write(&batch(topic, 3, 3..12)).await.unwrap();
    new_owner.flush(true).await.unwrap();

    // The old owner's stale records: refused, or skipped as already stored.
    let stale = async {
        let written = old_owner.write(&batch(topic, 3, 3..9)).await?.stats.written;
        old_owner.flush(true).await?;
        Ok::<_, cdc_lake::sink::SinkError>(written)
    }
    .await;
    if let Ok(written) = stale {
        assert_eq!(
            written,
            0,
            "{}: the stale writer stores nothing",
            old_owner.name()
        );
    }
    let cps = make().checkpoints(partitions).await.unwrap();
    assert_eq!(
        cps.get(&tp),
        Some(&12),
        "{}: the checkpoint is the new owner's",
        old_owner.name()
    );
}

/// After a revoke (another pod owns the partition now) nothing the sink had not acknowledged
/// becomes durable, and what it had acknowledged stays: a sink that buffers drops the buffer,
/// one that stores per batch has nothing to drop.
async fn revoke_makes_nothing_durable_that_was_not_acknowledged<S: Sink>(
    make: &mut impl FnMut() -> S,
    topic: &str,
) {
    let tp = TopicPartition::new(topic, 2);
    let mut sink = make();
    sink.checkpoints(std::slice::from_ref(&tp)).await.unwrap();
    let ack = sink.write(&batch(topic, 2, 0..6)).await.unwrap();
    // No checkpoint and a next offset of 0 both mean "nothing stored".
    let acknowledged = ack.durable.get(&tp).copied().unwrap_or(0);
    sink.revoke(std::slice::from_ref(&tp));
    sink.flush(true).await.unwrap();
    let stored = make()
        .checkpoints(std::slice::from_ref(&tp))
        .await
        .unwrap()
        .get(&tp)
        .copied()
        .unwrap_or(0);
    assert_eq!(
        stored,
        acknowledged,
        "{}: after a revoke the stored checkpoint is what was acknowledged",
        sink.name()
    );
}

async fn a_fresh_sink_has_no_checkpoint<S: Sink>(
    make: &mut impl FnMut() -> S,
    partitions: &[TopicPartition],
) {
    let mut sink = make();
    let fresh = sink.checkpoints(partitions).await.unwrap();
    assert!(
        fresh.is_empty(),
        "{}: a fresh sink has no checkpoint: {fresh:?}",
        sink.name()
    );
}

/// Every change of a batch is stored once (tombstones and malformed records counted, not
/// stored), and after a flush the acknowledged offsets are the batch's ends. Returns the batch.
async fn acknowledged_means_durable<S: Sink>(
    make: &mut impl FnMut() -> S,
    topic: &str,
    p0: &TopicPartition,
    p1: &TopicPartition,
) -> Batch {
    let mut sink = make();
    sink.checkpoints(&[p0.clone(), p1.clone()]).await.unwrap();
    let mut b1 = batch(topic, 0, 0..10);
    b1.records.extend(batch(topic, 1, 0..5).records);
    let changes_b1 = b1
        .records
        .iter()
        .filter(|r| matches!(r, cdc_lake::envelope::Decoded::Change(_)))
        .count() as u64;
    let ack = sink.write(&b1).await.unwrap();
    assert_eq!(
        ack.stats.written,
        changes_b1,
        "{}: every change stored once",
        sink.name()
    );
    let flushed = sink.flush(true).await.unwrap();
    let durable = |tp: &TopicPartition| flushed.durable.get(tp).or(ack.durable.get(tp)).copied();
    assert_eq!(
        durable(p0),
        Some(10),
        "{}: durable p0 after flush",
        sink.name()
    );
    assert_eq!(
        durable(p1),
        Some(5),
        "{}: durable p1 after flush",
        sink.name()
    );
    b1
}

/// A new instance (a restarted pod) reads the same checkpoints back from storage.
async fn a_restarted_sink_reads_its_checkpoints<S: Sink>(
    make: &mut impl FnMut() -> S,
    expected: &[(&TopicPartition, i64)],
) {
    let mut restarted = make();
    let partitions: Vec<TopicPartition> = expected.iter().map(|(tp, _)| (*tp).clone()).collect();
    let cps = restarted.checkpoints(&partitions).await.unwrap();
    for (tp, next) in expected {
        assert_eq!(
            cps.get(*tp),
            Some(next),
            "{}: stored checkpoint of {tp}",
            restarted.name()
        );
    }
}

/// Redelivery of records already stored (a crash before the Kafka commit) stores nothing.
async fn redelivery_stores_nothing_again<S: Sink>(make: &mut impl FnMut() -> S, b1: &Batch) {
    let mut restarted = make();
    let partitions: Vec<TopicPartition> = b1.ranges().keys().cloned().collect();
    restarted.checkpoints(&partitions).await.unwrap();
    let again = restarted.write(b1).await.unwrap();
    assert_eq!(
        again.stats.written,
        0,
        "{}: redelivery must be skipped",
        restarted.name()
    );
    assert_eq!(
        again.stats.already_stored,
        b1.len() as u64,
        "{}",
        restarted.name()
    );
}

/// A batch that starts below the checkpoint stores only the offsets past it.
async fn an_overlapping_batch_stores_only_new_offsets<S: Sink>(
    make: &mut impl FnMut() -> S,
    topic: &str,
    p0: &TopicPartition,
) {
    let mut restarted = make();
    restarted
        .checkpoints(std::slice::from_ref(p0))
        .await
        .unwrap();
    let b2 = batch(topic, 0, 5..15);
    let new_changes = b2
        .records
        .iter()
        .filter(|r| matches!(r, cdc_lake::envelope::Decoded::Change(e) if e.coords.offset >= 10))
        .count() as u64;
    let ack2 = restarted.write(&b2).await.unwrap();
    assert_eq!(
        ack2.stats.written,
        new_changes,
        "{}: only offsets 10..15 are new",
        restarted.name()
    );
    let flushed2 = restarted.flush(true).await.unwrap();
    let p0_durable = flushed2.durable.get(p0).or(ack2.durable.get(p0)).copied();
    assert_eq!(p0_durable, Some(15), "{}", restarted.name());
    let cps = make().checkpoints(std::slice::from_ref(p0)).await.unwrap();
    assert_eq!(
        cps.get(p0),
        Some(&15),
        "{}: checkpoint after the overlap",
        restarted.name()
    );
}

/// A batch that does not continue from the stored checkpoint (records 15..20 were never given
/// to this sink) is refused with a typed error, stores nothing, and the checkpoint stays.
async fn refuses_a_gap<S: Sink>(
    mut make: impl FnMut() -> S,
    topic: &str,
    tp: &TopicPartition,
    stored: i64,
) {
    let mut sink = make();
    sink.checkpoints(std::slice::from_ref(tp)).await.unwrap();
    let gap = batch(topic, tp.partition, stored + 5..stored + 10);
    let err = sink.write(&gap).await.expect_err("a gap is refused");
    assert!(
        matches!(err, cdc_lake::sink::SinkError::CheckpointGap { stored: s, batch_start, .. } if s == stored && batch_start == stored + 5),
        "{}: {err}",
        sink.name()
    );
    sink.flush(true).await.unwrap();
    let cps = make().checkpoints(std::slice::from_ref(tp)).await.unwrap();
    assert_eq!(
        cps.get(tp),
        Some(&stored),
        "{}: the checkpoint stays",
        sink.name()
    );
}

async fn pg_config() -> cdc_lake::config::PostgresConfig {
    let db = fresh_db("conformance").await;
    let mut client = pg(&db).await;
    cdc_lake::db::migrate(&mut client).await.unwrap();
    cdc_lake::config::PostgresConfig {
        url: db,
        password_file: None,
        password: None,
    }
}

/// The route sink with one filter that takes every change: each change is in the output topic
/// exactly once, read back by a consumer of its own.
#[test]
fn route_sink_conforms() {
    run_test(async {
        let pg = pg_config().await;
        let output = unique("conf-routed").replace('_', "-");
        let yaml =
            format!("filters:\n  - id: all\n    consumer: conformance\n    topic: {output}\n");
        let routes =
            std::sync::Arc::new(cdc_lake::route::Routes::parse("routes.yaml", &yaml).unwrap());
        let cfg = config(&pg.url, "unused", &LakeTarget::local("conf-route"), &[]);
        let mut topic = String::new();
        conformance(|| {
            cdc_lake::sink::route::RouteSink::new(
                routes.clone(),
                &cfg.kafka,
                &cfg.routes,
                pg.clone(),
                "conformance",
            )
            .unwrap()
        })
        .await;
        let routed = read_routed(&output);
        assert!(
            routed.values().all(|v| v.len() == 1),
            "routed twice: {routed:?}"
        );
        for ((t, _, _), values) in &routed {
            topic.clone_from(t);
            assert_eq!(values[0]["filterMetadata"]["filterId"], "all");
        }
        // What the suite acknowledged per partition; tombstones and malformed records are
        // not changes (see `batch`).
        let mut want = Vec::new();
        for (partition, next) in [(0, 15), (1, 5), (2, 6), (3, 12)] {
            for o in 0..next {
                if o % 5 != 4 && o % 9 != 8 {
                    want.push((topic.clone(), partition, o));
                }
            }
        }
        want.sort();
        let got: Vec<(String, i32, i64)> = routed.keys().cloned().collect();
        assert_eq!(got, want);
    });
}

#[test]
fn memory_sink_conforms() {
    run_test(async {
        let shared = MemorySink::default();
        conformance(|| shared.clone()).await;
    });
}

#[test]
fn raw_sink_conforms() {
    run_test(async {
        let pg = pg_config().await;
        conformance(|| RawSink::new(pg.clone(), "conformance")).await;
    });
}

#[test]
fn state_sink_conforms() {
    run_test(async {
        let pg = pg_config().await;
        let cfg = cdc_lake::config::StateConfig::default();
        conformance(|| StateSink::new(pg.clone(), &cfg, "conformance")).await;
    });
}

/// A target with a mapping (an analytics table instead of mirrors) keeps the same contract.
#[test]
fn mapped_target_conforms() {
    run_test(async {
        let pg = pg_config().await;
        let setup = std::env::temp_dir().join(format!("{}.sql", unique("conf_mapped")));
        std::fs::write(
            &setup,
            "CREATE SCHEMA IF NOT EXISTS conf_mapped;
             CREATE TABLE IF NOT EXISTS conf_mapped.conf_rows (id integer PRIMARY KEY, v bigint);",
        )
        .unwrap();
        let mapping: cdc_lake::config::MappingConfig = toml::from_str(
            r#"topic = "^conf-.*"
               table = "conf_rows"
               key = ["id"]
               columns = { id = "id", v = "v" }"#,
        )
        .unwrap();
        let target = cdc_lake::config::Target {
            name: "conf_mapped".into(),
            postgres: pg.clone(),
            state: cdc_lake::config::StateConfig {
                schema: "conf_mapped".into(),
                ..Default::default()
            },
            setup_sql: vec![setup],
            mappings: vec![mapping],
        };
        conformance(|| StateSink::for_target(&target, "conformance")).await;
        // The oracle for the rows, folded from what the batches held: per key (offset % 7) the
        // change with the highest source position (the LSN is 1000 + offset), skipping the
        // tombstones (offset % 5 == 4) and the malformed records (offset % 9 == 8).
        let valid = |o: &i64| o % 5 != 4 && o % 9 != 8;
        let mut expected = std::collections::BTreeMap::new();
        for o in (0..15).chain(0..5).filter(valid) {
            let v = expected.entry((o % 7) as i32).or_insert(o);
            *v = (*v).max(o);
        }
        let expected: Vec<(i32, i64)> = expected.into_iter().collect();
        let rows = pg_rows(
            &pg.url,
            "SELECT id, v FROM conf_mapped.conf_rows ORDER BY id",
        )
        .await;
        assert_eq!(
            rows, expected,
            "mapped rows against the fold of the batches"
        );
    });
}

async fn pg_rows(url: &str, sql: &str) -> Vec<(i32, i64)> {
    pairs(&pg(url).await, sql, &[]).await
}

fn lake_config(target: &LakeTarget) -> cdc_lake::config::LakeConfig {
    let db_unused = "postgres://postgres@127.0.0.1:5432/unused";
    config(db_unused, "unused", target, &[]).lake
}

/// What the lake holds of the fenced step's partition 3 (read from the objects, not the
/// manifest): every change of 0..12 once, the new owner's, whatever the stale writer did.
fn assert_fenced_partition_is_whole(report: &serde_json::Value) {
    let stored: Vec<i64> = lake_coords(report)
        .into_iter()
        .filter(|(_, p, _)| *p == 3)
        .map(|(.., o)| o)
        .collect();
    // batch(): every 5th offset is a tombstone and every 9th malformed; neither is a change.
    let changes: Vec<i64> = (0..12).filter(|o| o % 5 != 4 && o % 9 != 8).collect();
    assert_eq!(
        stored, changes,
        "the lake's partition 3 after a stale writer"
    );
}

#[test]
fn lake_sink_on_local_disk_conforms() {
    run_test(async {
        let target = LakeTarget::local("conf-lake");
        let cfg = lake_config(&target);
        conformance(|| LakeSink::new(&cfg).unwrap()).await;
        let report = target.check();
        assert_eq!(report["duplicates"], 0, "{report}");
        assert_eq!(report["unlisted"].as_array().unwrap().len(), 0, "{report}");
        assert_fenced_partition_is_whole(&report);
    });
}

#[test]
fn lake_sink_on_s3_conforms() {
    run_test(async {
        let target = LakeTarget::s3("conf-lake");
        let cfg = lake_config(&target);
        conformance(|| LakeSink::new(&cfg).unwrap()).await;
        let report = target.check();
        assert_eq!(report["duplicates"], 0, "{report}");
        assert_eq!(report["unlisted"].as_array().unwrap().len(), 0, "{report}");
        assert_fenced_partition_is_whole(&report);
    });
}

/// An in-memory object store whose data-file puts fail while `failures` is above zero: an S3
/// outage in the middle of a lake commit.
#[derive(Debug)]
struct FlakyStore {
    inner: object_store::memory::InMemory,
    failures: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Display for FlakyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlakyStore")
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for FlakyStore {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        use std::sync::atomic::Ordering;
        if location.as_ref().ends_with(".parquet") && self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err(object_store::Error::Generic {
                store: "FlakyStore",
                source: "injected outage".into(),
            });
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &object_store::path::Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

/// The pipeline retries a failed write with the same batch. A lake write that buffered the
/// records and then failed to upload must not buffer them again (found by tools/faults: an S3
/// outage left the retried records several times in one file).
#[test]
fn lake_write_retried_after_an_upload_failure_stores_each_offset_once() {
    run_test(async {
        use std::sync::Arc;
        let store = Arc::new(FlakyStore {
            inner: object_store::memory::InMemory::new(),
            failures: std::sync::atomic::AtomicUsize::new(2),
        });
        let cfg = cdc_lake::config::LakeConfig {
            roll_rows: 10,
            ..Default::default()
        };
        let mut sink = LakeSink::with_store(store.clone(), &cfg, "flaky".into()).unwrap();
        let b = batch("flaky", 0, 0..40);
        let changes = b
            .records
            .iter()
            .filter(|r| matches!(r, cdc_lake::envelope::Decoded::Change(_)))
            .count() as u64;
        assert!(sink.write(&b).await.is_err(), "the first upload fails");
        assert!(sink.write(&b).await.is_err(), "and the second");
        let ack = sink.write(&b).await.unwrap();
        sink.flush(true).await.unwrap();
        assert_eq!(
            ack.stats.written, 0,
            "the retries found everything buffered"
        );
        let tp = TopicPartition::new("flaky", 0);
        let commits = cdc_lake::sink::lake::read_commits(
            &*store,
            &cdc_lake::sink::lake::manifest::Layout::new(""),
            &tp,
        )
        .await
        .unwrap();
        let rows: u64 = commits.iter().flat_map(|c| &c.files).map(|f| f.rows).sum();
        assert_eq!(rows, changes, "each change once in the lake");
        assert_eq!(commits.last().unwrap().next_offset, 40);
    });
}
