//! cdc-replay, verify and prune-raw against real services: a rebuilt target equals the
//! live-built one (from the raw log and from the lake, also after pruning the raw log), both
//! readers stream every selected change once and in order, `--until`
//! equals the source database as it was then (real Debezium), a replay into a live target changes
//! nothing, and bad arguments fail before any write.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use cdc_lake::config::Config;
use cdc_lake::domain::TableId;
use cdc_lake::replay::{self, SourceKind, Until};
use common::*;
use tokio_postgres::Client;

/// An ordered hash of every table in a schema (each row as JSON without the wall-clock
/// `cdc_synced_at`), by table name.
async fn schema_hash(client: &Client, schema: &str) -> BTreeMap<String, (i64, String)> {
    let tables: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = BTreeMap::new();
    for t in tables {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(j, '|' ORDER BY j)), '')
                       FROM (SELECT (to_jsonb(x) - 'cdc_synced_at')::text AS j FROM \"{schema}\".\"{t}\" x) r"
                ),
                &[],
            )
            .await
            .unwrap();
        out.insert(t, (row.get(0), row.get(1)));
    }
    out
}

/// The config of a test plus named targets that only replays write.
fn with_targets(db: &str, prefix: &str, lake: &LakeTarget, targets: &[&str]) -> Config {
    let mut extra: Vec<(String, String)> = Vec::new();
    for t in targets {
        let up = t.to_ascii_uppercase();
        extra.push((format!("CDC_LAKE__TARGETS__{up}__SCHEMA"), format!("t_{t}")));
        extra.push((format!("CDC_LAKE__TARGETS__{up}__ENABLED"), "false".into()));
    }
    let extra: Vec<(&str, &str)> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    config(db, prefix, lake, &extra)
}

/// A captured Debezium sample file through the pod, which is then stopped (drained).
async fn ingest_samples(
    file: &str,
    db: &str,
    prefix: &str,
    lake: &LakeTarget,
    targets: &[&str],
) -> Config {
    let mut records = load_fixture(file);
    retopic(&mut records, prefix);
    produce(&records).await;
    let cfg = with_targets(db, prefix, lake, targets);
    let pod = Pod::start(cfg.clone());
    let client = pg(db).await;
    wait_raw_rows(
        &client,
        records.len() as i64,
        "every sample in the raw log",
        Duration::from_secs(60),
    )
    .await;
    pod.stop().await;
    cfg
}

#[test]
fn rebuild_from_raw_and_from_lake_equals_live_even_after_prune() {
    run_test(async {
        let prefix = unique("rpl").replace('_', "-");
        let db = fresh_db("replay").await;
        let lake = LakeTarget::local("replay");
        // The {schema, payload} capture: declared types (decimals, timestamps) for the replay.
        let cfg = ingest_samples(
            "bookstore-defaults.ndjson",
            &db,
            &prefix,
            &lake,
            &["fromraw", "fromlake", "pruned"],
        )
        .await;
        let client = pg(&db).await;
        let live = schema_hash(&client, "cdc_processed").await;
        assert!(live.len() >= 3, "mirrors of the sample tables: {live:?}");
        // Declared schemas were stored for the replay.
        assert!(count(&client, "SELECT count(*) FROM cdc_raw.cdc_row_schemas").await > 0);

        let s = replay::run(&cfg, &rebuild_args("fromraw", SourceKind::Raw))
            .await
            .unwrap();
        assert_eq!(
            s.events,
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await as u64
        );
        assert_eq!(
            schema_hash(&client, "t_fromraw").await,
            live,
            "rebuilt from raw"
        );

        replay::run(&cfg, &rebuild_args("fromlake", SourceKind::Lake))
            .await
            .unwrap();
        assert_eq!(
            schema_hash(&client, "t_fromlake").await,
            live,
            "rebuilt from the lake"
        );

        // Rebuilding the live target itself gives it back unchanged.
        replay::run(&cfg, &rebuild_args("processed", SourceKind::Raw))
            .await
            .unwrap();
        assert_eq!(
            schema_hash(&client, "cdc_processed").await,
            live,
            "processed rebuilt in place"
        );

        // Verify agrees with the live target...
        let target = cfg.target("processed").unwrap();
        let reader = replay::Reader::open(&cfg, SourceKind::Raw).await.unwrap();
        let diffs = replay::compare::verify(&cfg, &target, &reader)
            .await
            .unwrap();
        assert!(
            !diffs.is_empty() && diffs.iter().all(|d| d.is_empty()),
            "{diffs:?}"
        );
        // ...and catches a tampered row.
        client
            .batch_execute("UPDATE cdc_processed.books SET price = price + 1 WHERE title = 'Dune'")
            .await
            .unwrap();
        let diffs = replay::compare::verify(&cfg, &target, &reader)
            .await
            .unwrap();
        let books = diffs.iter().find(|d| d.table == "books").unwrap();
        assert_eq!(
            (books.differs, books.missing, books.unexpected),
            (1, 0, 0),
            "{books:?}"
        );

        // A replay without --rebuild cannot repair it: the tampered row carries the position of the
        // last change, which the ordering guard does not overwrite. A dry run says so...
        let mut dry = rebuild_args("processed", SourceKind::Raw);
        dry.dry_run = true;
        dry.rebuild = false;
        let tampered = schema_hash(&client, "cdc_processed").await;
        let s = replay::run(&cfg, &dry).await.unwrap();
        assert!(s.changes.iter().all(|d| d.is_empty()), "{:?}", s.changes);
        // ...and a dry run of a rebuild reports the repair, writing nothing.
        dry.rebuild = true;
        let s = replay::run(&cfg, &dry).await.unwrap();
        let books = s.changes.iter().find(|d| d.table == "books").unwrap();
        assert_eq!(
            (books.differs, books.missing, books.unexpected),
            (1, 0, 0),
            "{books:?}"
        );
        assert_eq!(schema_hash(&client, "cdc_processed").await, tampered);
        replay::run(&cfg, &rebuild_args("processed", SourceKind::Raw))
            .await
            .unwrap();
        assert_eq!(
            schema_hash(&client, "cdc_processed").await,
            live,
            "repaired by the rebuild"
        );

        // Retention: every raw row is in the lake, so prune-raw removes them all...
        let future = chrono::Utc::now() + chrono::Duration::hours(1);
        let report = replay::prune::prune_raw(&cfg, future, false).await.unwrap();
        assert!(report.deleted() > 0);
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await,
            0
        );
        // ...the raw log has nothing left to replay...
        let err = replay::run(&cfg, &rebuild_args("pruned", SourceKind::Raw))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nothing to replay"), "{err}");
        // ...and the lake still rebuilds the same state.
        replay::run(&cfg, &rebuild_args("pruned", SourceKind::Lake))
            .await
            .unwrap();
        assert_eq!(
            schema_hash(&client, "t_pruned").await,
            live,
            "rebuilt from the lake after prune"
        );
    });
}

#[test]
fn prune_keeps_rows_the_lake_does_not_prove() {
    run_test(async {
        let prefix = unique("prn").replace('_', "-");
        let db = fresh_db("prune").await;
        let lake = LakeTarget::local("prune");
        let cfg = ingest_samples("bookstore-seed.ndjson", &db, &prefix, &lake, &[]).await;
        let client = pg(&db).await;
        let total = count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await;
        // Remove one manifest entry: the offsets it covered are no longer proven.
        let LakeTarget::Local(dir) = &lake else {
            unreachable!()
        };
        let manifest = walk(&dir.join("_manifest"))
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "json") && !p.ends_with("_pending.json"))
            .expect("a manifest entry");
        let entry: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        std::fs::remove_file(&manifest).unwrap();
        let (first, next) = (
            entry["first_offset"].as_i64().unwrap(),
            entry["next_offset"].as_i64().unwrap(),
        );
        let topic = entry["topic"].as_str().unwrap();

        let future = chrono::Utc::now() + chrono::Duration::hours(1);
        replay::prune::prune_raw(&cfg, future, false).await.unwrap();
        let kept = count(
            &client,
            &format!(
                "SELECT count(*) FROM cdc_raw.cdc_events WHERE kafka_topic = '{topic}' AND kafka_partition = {} AND kafka_offset >= {first} AND kafka_offset < {next}",
                entry["partition"]
            ),
        )
        .await;
        assert!(kept > 0, "rows of the unproven range are kept");
        assert!(count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await < total);
    });
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn rebuild_of_a_live_target_while_the_pod_runs_changes_nothing() {
    run_test(async {
        let prefix = unique("live").replace('_', "-");
        let (records, model) = order_stream(&prefix, 6_000);
        let topic = records[0].topic.clone();
        create_topics(&[topic.clone()].into_iter().collect(), 4).await;
        let half = records.len() / 2;
        produce(&records[..half]).await;
        let db = fresh_db("livereplay").await;
        let lake = LakeTarget::local("livereplay");
        let cfg = config(
            &db,
            &prefix,
            &lake,
            &[("CDC_LAKE__BATCH__MAX_RECORDS", "500")],
        );
        let pod = Pod::start(cfg.clone());
        let client = pg(&db).await;
        wait_until(
            "the first half in the raw log",
            Duration::from_secs(60),
            || async {
                count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await >= half as i64
            },
        )
        .await;

        // The second half arrives while a full rebuild of the live target runs.
        let producing = tokio::spawn({
            let rest = records[half..].to_vec();
            async move { produce(&rest).await }
        });
        let mut a = rebuild_args("processed", SourceKind::Raw);
        a.batch_size = 700;
        replay::run(&cfg, &a).await.unwrap();
        producing.await.unwrap();
        wait_raw_rows(
            &client,
            records.len() as i64,
            "every record in the raw log",
            Duration::from_secs(60),
        )
        .await;
        wait_until("the state checkpoint at the end", Duration::from_secs(60), || async {
            count(
                &client,
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM cdc_lake.checkpoints WHERE sink = 'state'",
            )
            .await
                == records.len() as i64
        })
        .await;
        pod.stop().await;

        let state: BTreeMap<String, String> = pairs(
            &client,
            "SELECT id::text, status FROM cdc_processed.orders WHERE NOT cdc_deleted",
            &[],
        )
        .await;
        assert_eq!(state, model, "the live target equals the reference model");
        let target = cfg.target("processed").unwrap();
        let reader = replay::Reader::open(&cfg, SourceKind::Raw).await.unwrap();
        let diffs = replay::compare::verify(&cfg, &target, &reader)
            .await
            .unwrap();
        assert!(diffs.iter().all(|d| d.is_empty()), "{diffs:?}");
    });
}

/// Both readers stream each selected change exactly once, partition by partition in offset
/// order: checked against the raw log's own rows, for the whole log and for an offset range.
/// The rebuild tests cannot see this: the ordering guard makes a mirror's final state the same
/// whatever order its changes arrive in. Then the lake is compacted into one file per
/// partition, each larger than the lake reader's chunk, and read again: the same changes in
/// the same order, in chunks no larger than `LAKE_CHUNK` (a reader that decoded a file whole
/// held a compacted lake's millions of changes in memory at once).
#[test]
fn the_readers_stream_every_selected_change_once_in_order() {
    run_test(async {
        let prefix = unique("order").replace('_', "-");
        // More than LAKE_CHUNK changes per partition, so one compacted file exceeds a chunk.
        let (records, _) = order_stream(&prefix, 12_000);
        let topic = records[0].topic.clone();
        create_topics(&[topic.clone()].into_iter().collect(), 4).await;
        produce(&records).await;
        let db = fresh_db("readorder").await;
        let lake = LakeTarget::local("readorder");
        let cfg = config(&db, &prefix, &lake, &[]);
        let pod = Pod::start(cfg.clone());
        let client = pg(&db).await;
        wait_raw_rows(
            &client,
            records.len() as i64,
            "every record in the raw log",
            Duration::from_secs(60),
        )
        .await;
        // A graceful stop drains: the lake then holds every record too.
        pod.stop().await;

        let whole = replay::Selection::default();
        let range = replay::Selection {
            from_offset: 321,
            to_offset: Some(1_234),
            ..replay::Selection::default()
        };
        let compact_the_lake = || {
            let out = Command::new(env!("CARGO_BIN_EXE_cdc-lake"))
                .args(["lake", "compact", "--before", "2100-01-01"])
                .envs(lake.env())
                .env("CDC_LAKE__POSTGRES__URL", &db)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                stdout.contains("files -> 4;"),
                "one file per partition: {stdout}"
            );
        };
        let per_partition = (0..4)
            .map(|p| records.iter().filter(|r| r.partition == p).count())
            .min()
            .unwrap();
        assert!(
            per_partition > replay::source::LAKE_CHUNK,
            "{per_partition}"
        );
        for (source, compact) in [
            (SourceKind::Raw, false),
            (SourceKind::Lake, false),
            (SourceKind::Lake, true),
        ] {
            if compact {
                compact_the_lake();
            }
            let reader = replay::Reader::open(&cfg, source).await.unwrap();
            for sel in [&whole, &range] {
                let want: Vec<(String, i32, i64)> = client
                    .query(
                        "SELECT kafka_topic, kafka_partition, kafka_offset FROM cdc_raw.cdc_events
                          WHERE kafka_offset >= $1 AND kafka_offset <= coalesce($2, kafka_offset)
                          ORDER BY 1, 2, 3",
                        &[&sel.from_offset, &sel.to_offset],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect();
                let mut got = Vec::new();
                let mut chunks = reader.read(&cfg, sel).await.unwrap();
                let mut largest = 0;
                while let Some(chunk) = chunks.recv().await {
                    let chunk = chunk.unwrap();
                    largest = largest.max(chunk.len());
                    for change in chunk {
                        let c = change.coords();
                        got.push((c.topic.clone(), c.partition, c.offset));
                    }
                }
                let first_difference = got.iter().zip(&want).position(|(g, w)| g != w);
                assert!(
                    got.len() == want.len() && first_difference.is_none(),
                    "{source} reader, {sel}: {} changes streamed, the raw log holds {}; first \
                     difference at position {first_difference:?}",
                    got.len(),
                    want.len()
                );
                if source == SourceKind::Lake {
                    assert!(
                        largest <= replay::source::LAKE_CHUNK,
                        "lake reader (compacted: {compact}), {sel}: a chunk of {largest} changes"
                    );
                }
            }
        }
    });
}

/// Invalid arguments fail with one line and a non-zero exit, before anything is written.
#[test]
fn bad_arguments_fail_before_any_write() {
    run_test(async {
        let db = fresh_db("replayargs").await;
        let env = [("CDC_LAKE__POSTGRES__URL", db.as_str())];
        let run = |args: &[&str]| {
            let out = Command::new(env!("CARGO_BIN_EXE_cdc-replay"))
                .args(args)
                .envs(env)
                .env("CDC_LAKE__KAFKA__BROKERS", broker())
                .env("CDC_LAKE__TARGETS", "{}")
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            )
        };
        // Arguments that are wrong exit 2 (as clap's own errors do); a failed command exits 1.
        let (code, err) = run(&["--from-offset", "10", "--to-offset", "5"]);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("invalid range") && err.lines().count() == 1,
            "{err}"
        );
        let (code, err) = run(&["--target", "nope"]);
        assert_eq!(code, Some(1));
        assert!(err.contains("unknown target \"nope\""), "{err}");
        let (code, err) = run(&["--until", "yesterday"]);
        assert_eq!(code, Some(2), "clap rejects it: {err}");
        assert!(err.contains("neither a timestamp"), "{err}");
        let prune = Command::new(env!("CARGO_BIN_EXE_cdc-lake"))
            .args(["prune-raw", "--before", "0/16B3748"])
            .envs(env)
            .env("CDC_LAKE__TARGETS", "{}")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&prune.stderr);
        assert_eq!(prune.status.code(), Some(2), "{err}");
        assert!(err.contains("--before takes a time, not an LSN"), "{err}");
        // Nothing was written: the sink database was not even migrated.
        let client = pg(&db).await;
        assert_eq!(
            count(
                &client,
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'cdc_processed'"
            )
            .await,
            0
        );

        assert_eq!("0/16B3748".parse::<Until>().unwrap(), Until::Lsn(0x16B3748));
        assert!(matches!(
            "2026-11-21 09:30:00".parse::<Until>(),
            Ok(Until::Time(_))
        ));
    });
}

/// `--until` rebuilds state as it was: real Debezium changes before and after a recorded
/// moment; the replica replayed until that moment equals the source table read at that moment.
/// The test owns its source table, so rows other runs left in the shared source database (whose
/// history the broker may no longer hold) cannot affect the whole-table comparison.
#[test]
fn until_equals_the_source_database_at_that_time() {
    run_test(async {
        let source = pg(&source_url()).await;
        let table = unique("asof");
        source
            .batch_execute(&format!(
                "CREATE TABLE {table} (id serial PRIMARY KEY, title text NOT NULL, price numeric(10,2))"
            ))
            .await
            .unwrap();
        let db = fresh_db("until").await;
        let lake = LakeTarget::local("until");
        let cfg = with_targets(&db, "ecom-connector", &lake, &["asof"]);
        let pod = Pod::start(cfg.clone());
        let rows_of = |schema: &str| {
            format!(
                "SELECT id::int, title, price::numeric(10,2)::text FROM {schema}.{table} ORDER BY 1"
            )
        };
        for i in 0..3 {
            source
                .execute(
                    &format!("INSERT INTO {table} (title, price) VALUES ($1, $2::text::numeric)"),
                    &[&format!("before-{i}"), &format!("{}.25", 10 + i)],
                )
                .await
                .unwrap();
        }
        source
            .batch_execute(&format!(
                "UPDATE {table} SET price = price + 0.5 WHERE title = 'before-0'"
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let at: chrono::DateTime<chrono::Utc> =
            source.query_one("SELECT now()", &[]).await.unwrap().get(0);
        let then = id_title_price(&source, &rows_of("public")).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        source
            .batch_execute(&format!(
                "UPDATE {table} SET price = 99 WHERE title = 'before-1';
                 DELETE FROM {table} WHERE title = 'before-2';
                 INSERT INTO {table} (title, price) VALUES ('after', 1)"
            ))
            .await
            .unwrap();
        let client = pg(&db).await;
        wait_until(
            "the later changes in the mirror",
            Duration::from_secs(120),
            || async {
                client
                    .query(
                        &format!(
                            "SELECT count(*) FROM cdc_processed.{table} WHERE title = 'after'"
                        ),
                        &[],
                    )
                    .await
                    .map(|r| r[0].get::<_, i64>(0))
                    .unwrap_or(0)
                    == 1
            },
        )
        .await;
        pod.stop().await;

        let mut a = rebuild_args("asof", SourceKind::Raw);
        a.until = Some(Until::Time(at));
        replay::run(&cfg, &a).await.unwrap();
        let rebuilt = id_title_price(&client, &rows_of("t_asof")).await;
        assert_eq!(then.len(), 3);
        assert_eq!(rebuilt, then, "state at {at}");
        let now = id_title_price(&source, &rows_of("public")).await;
        assert_ne!(rebuilt, now, "the later changes are not in the replica");

        // verify --source-db: the live mirror equals the source table now, and a tampered mirror
        // row is reported.
        let processed = cfg.target("processed").unwrap();
        let tables: std::collections::BTreeSet<TableId> = [TableId::new("public", &table)].into();
        let source_url = source_url();
        let res = replay::compare::compare_with_source(&processed, &source_url, &tables)
            .await
            .unwrap();
        assert!(res.len() == 1 && res[0].0.is_empty(), "{res:?}");
        client
            .batch_execute(&format!(
                "UPDATE cdc_processed.{table} SET title = 'tampered' WHERE title = 'after'"
            ))
            .await
            .unwrap();
        let res = replay::compare::compare_with_source(&processed, &source_url, &tables)
            .await
            .unwrap();
        assert_eq!(res[0].0.differs, 1, "{res:?}");
        source
            .batch_execute(&format!("DROP TABLE {table}"))
            .await
            .unwrap();
    });
}

async fn id_title_price(client: &tokio_postgres::Client, sql: &str) -> Vec<(i32, String, String)> {
    let rows = client.query(sql, &[]).await.unwrap();
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}
