//! Shared helpers for the integration tests. They talk to real services started by
//! `tools/test` (or `tools/up`): PostgreSQL, the tansu broker and the moto S3 server.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cdc_lake::config::Config;
use cdc_lake::replay::{ReplayArgs, SourceKind};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::Value;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

pub fn broker() -> String {
    std::env::var("CDC_LAKE_TEST_BROKER").unwrap_or_else(|_| "127.0.0.1:19092".into())
}
pub fn s3_endpoint() -> String {
    std::env::var("CDC_LAKE_TEST_S3").unwrap_or_else(|_| "http://127.0.0.1:19000".into())
}
pub fn pg_base() -> String {
    std::env::var("CDC_LAKE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}
pub fn python() -> String {
    std::env::var("CDC_LAKE_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/cdc-lake/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    })
}

/// A name no other test run uses: lowercase, digits and `_`.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

pub async fn pg(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e} (is PostgreSQL up? run tools/up)"));
    tokio::spawn(conn);
    client
}

/// Creates an empty database for one test and returns its URL.
pub async fn fresh_db(name: &str) -> String {
    let db = unique(&format!("cdct_{name}"));
    let admin = pg(&format!("{}/postgres", pg_base())).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    format!("{}/{db}", pg_base())
}

/// One record of a captured Debezium sample file.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
}

/// The dev stack's source database (tools/up --debezium), which real Debezium captures.
pub fn source_url() -> String {
    std::env::var("CDC_LAKE_TEST_SOURCE_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/ecomdb".into())
}

/// Drops a database of the source PostgreSQL that a test created for real Debezium, with its
/// replication slots (a slot keeps its database from being dropped).
pub async fn drop_source_db(db: &str) {
    let base = source_url().rsplit_once('/').unwrap().0.to_string();
    let admin = pg(&format!("{base}/postgres")).await;
    // Two statements: DROP DATABASE cannot share an implicit transaction.
    admin
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{db}'"
        ))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/debezium")
        .join(name)
}

pub fn load_fixture(name: &str) -> Vec<Fixture> {
    read_fixture(&fixture_path(name))
}

/// Reads a capture in the samples' NDJSON format (`tools/capture-zoo` writes the same).
pub fn read_fixture(path: &Path) -> Vec<Fixture> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Fixture {
                topic: v["topic"].as_str().unwrap().to_string(),
                partition: v["partition"].as_i64().unwrap() as i32,
                offset: v["offset"].as_i64().unwrap(),
                key: v["key"].as_str().map(str::to_string),
                value: v["value"].as_str().map(str::to_string),
            }
        })
        .collect()
}

/// Rewrites `<prefix>.<schema>.<table>` topics to a fresh prefix, so every test has its own
/// topics on the shared broker.
pub fn retopic(records: &mut [Fixture], prefix: &str) {
    for r in records {
        let rest = r
            .topic
            .split_once('.')
            .map(|(_, rest)| rest.to_string())
            .unwrap();
        r.topic = format!("{prefix}.{rest}");
    }
}

pub async fn create_topics(topics: &BTreeSet<String>, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .create()
        .unwrap();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .unwrap();
    for r in results {
        if let Err((t, e)) = r {
            // Auto-created meanwhile is fine.
            assert!(
                format!("{e:?}").contains("TopicAlreadyExists"),
                "create topic {t}: {e:?}"
            );
        }
    }
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", broker())
        .set("linger.ms", "5")
        .set("max.in.flight.requests.per.connection", "1")
        .create()
        .unwrap()
}

/// Produces records in order, each to its given partition; waits for every delivery and
/// returns the offsets the broker assigned.
pub async fn produce(records: &[Fixture]) -> Vec<(String, i32, i64)> {
    let topics: BTreeSet<String> = records.iter().map(|r| r.topic.clone()).collect();
    create_topics(&topics, 4).await;
    let p = producer();
    let mut pending = Vec::new();
    for r in records {
        let mut rec = FutureRecord::<str, str>::to(&r.topic).partition(r.partition);
        if let Some(k) = &r.key {
            rec = rec.key(k);
        }
        if let Some(v) = &r.value {
            rec = rec.payload(v);
        }
        pending.push(p.send_result(rec).map_err(|(e, _)| e).unwrap());
    }
    let mut out = Vec::new();
    for (r, f) in records.iter().zip(pending) {
        let delivery = f.await.unwrap().map_err(|(e, _)| e).unwrap();
        out.push((r.topic.clone(), delivery.partition, delivery.offset));
    }
    out
}

/// The embedded defaults with overrides for one test: its own database, topics, group and lake.
pub fn config(
    db_url: &str,
    topic_prefix: &str,
    lake: &LakeTarget,
    extra: &[(&str, &str)],
) -> Config {
    let mut env: Vec<(String, String)> = vec![
        ("CDC_LAKE__KAFKA__BROKERS".into(), broker()),
        ("CDC_LAKE__KAFKA__GROUP_ID".into(), unique("group")),
        (
            "CDC_LAKE__KAFKA__TOPICS".into(),
            format!("['^{}\\..*']", topic_prefix.replace('.', "\\.")),
        ),
        (
            "CDC_LAKE__KAFKA__PROPERTIES__TOPIC.METADATA.REFRESH.INTERVAL.MS".into(),
            "1000".into(),
        ),
        ("CDC_LAKE__POSTGRES__URL".into(), db_url.into()),
        ("CDC_LAKE__HTTP__LISTEN".into(), "".into()),
        ("CDC_LAKE__LAKE__ROLL_AGE".into(), "1s".into()),
    ];
    match lake {
        LakeTarget::Local(dir) => {
            env.push(("CDC_LAKE__LAKE__ROOT".into(), dir.display().to_string()))
        }
        LakeTarget::S3 {
            prefix,
            secret_file,
        } => {
            env.push(("CDC_LAKE__LAKE__PREFIX".into(), prefix.clone()));
            env.push(("CDC_LAKE__LAKE__S3__BUCKET".into(), "cdc-lake".into()));
            env.push(("CDC_LAKE__LAKE__S3__ENDPOINT".into(), s3_endpoint()));
            env.push(("CDC_LAKE__LAKE__S3__ALLOW_HTTP".into(), "true".into()));
            env.push(("CDC_LAKE__LAKE__S3__ACCESS_KEY_ID".into(), "testing".into()));
            env.push((
                "CDC_LAKE__LAKE__S3__SECRET_ACCESS_KEY_FILE".into(),
                secret_file.display().to_string(),
            ));
        }
    }
    // The demo's analytics and replica targets live in shared databases: a test that wants a
    // target configures its own (tests/analytics.rs).
    env.push(("CDC_LAKE__TARGETS".into(), "{}".into()));
    for (k, v) in extra {
        env.push((k.to_string(), v.to_string()));
    }
    Config::load_with_env(None, env).unwrap()
}

/// `cfg` plus the demo's `[targets.*]` named in `urls`, each pointed at its database, with the
/// demo's topics (ecom-connector.*, inventory-connector.*) renamed to the given prefixes.
pub fn with_demo_targets(
    mut cfg: Config,
    (ecom, inventory): (&str, &str),
    urls: &[(&str, &str)],
) -> Config {
    let demo = Config::load_with_env(None, Vec::<(String, String)>::new()).unwrap();
    for (name, url) in urls {
        let mut t = demo.targets[*name].clone();
        t.url = Some(url.to_string());
        for m in &mut t.mappings {
            m.topic = m
                .topic
                .replace("ecom-connector.", &format!("{ecom}."))
                .replace("inventory-connector.", &format!("{inventory}."));
        }
        cfg.targets.insert(name.to_string(), t);
    }
    cfg
}

pub enum LakeTarget {
    Local(PathBuf),
    S3 {
        prefix: String,
        secret_file: PathBuf,
    },
}

impl LakeTarget {
    pub fn local(name: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&dir).unwrap();
        LakeTarget::Local(dir)
    }

    pub fn s3(name: &str) -> Self {
        let secret_file = std::env::temp_dir().join(unique("s3-secret"));
        std::fs::write(&secret_file, "testing").unwrap();
        LakeTarget::S3 {
            prefix: unique(name),
            secret_file,
        }
    }

    /// Reads the lake with pyarrow (an independent reader): every Parquet object found by
    /// listing, checked against the manifest.
    pub fn check(&self) -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_check.py");
        let mut cmd = Command::new(python());
        cmd.arg(script);
        match self {
            LakeTarget::Local(dir) => {
                cmd.args(["--dir", &dir.display().to_string()]);
            }
            LakeTarget::S3 { prefix, .. } => {
                cmd.args(["--s3", &s3_endpoint(), "cdc-lake", prefix]);
            }
        }
        let out = cmd.output().expect("run tests/lake_check.py");
        assert!(
            out.status.success(),
            "lake_check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// The (topic, partition, offset) of every row a lake report found.
pub fn lake_coords(report: &Value) -> BTreeSet<(String, i32, i64)> {
    report["coords"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c[0].as_str().unwrap().to_string(),
                c[1].as_i64().unwrap() as i32,
                c[2].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The ingest pod running in this process.
pub struct Pod {
    pub shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Pod {
    pub fn start(config: Config) -> Pod {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,tokio_postgres=warn".into()),
            )
            .with_test_writer()
            .try_init();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(cdc_lake::ingest::run(config, shutdown.clone(), false));
        Pod { shutdown, handle }
    }

    /// SIGTERM-like: drain, checkpoint, commit, leave the group.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("pod stops within 20s")
            .unwrap()
            .unwrap();
    }

    /// SIGTERM-like, returning how the pod ended (an error when a sink could not finish).
    pub async fn stop_result(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("pod stops within 20s")
            .unwrap()
    }

    /// Crash-like: the task is dropped wherever it is (mid-COPY, mid-upload), then the
    /// consumer thread is told to go.
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
        self.shutdown.cancel();
    }
}

/// The config for the pod that replaces a killed one: a fresh consumer group under the same
/// checkpoint name. It resumes every sink from its stored checkpoint and never waits for the
/// dead member to leave the old group, which the dev broker's coordinator can take minutes to
/// notice (`../shared/ENVIRONMENT.md`). Kafka's committed offsets are for monitoring only, so
/// nothing depends on the old group.
pub fn after_kill(cfg: &Config) -> Config {
    let mut next = cfg.clone();
    next.kafka
        .checkpoint_name
        .get_or_insert_with(|| cfg.kafka.group_id.clone());
    next.kafka.group_id = unique("group");
    next
}

/// `cdc-replay --rebuild --target <target> --source <source>` from offset 0.
pub fn rebuild_args(target: &str, source: SourceKind) -> ReplayArgs {
    ReplayArgs {
        from_offset: 0,
        to_offset: None,
        topic: None,
        partition: None,
        until: None,
        target: target.into(),
        source,
        rebuild: true,
        dry_run: false,
        batch_size: 1000,
    }
}

/// Polls `check` until it returns true, or panics after `timeout` with `what`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The single bigint `sql` returns; −1 while what it reads is not there yet (no row, or a
/// table or column the pod has not created), so waits can poll for it. Any other SQL error
/// (syntax, types, a lost connection) panics with the statement instead of timing out.
pub async fn count(client: &Client, sql: &str) -> i64 {
    use tokio_postgres::error::SqlState;
    match client.query_opt(sql, &[]).await {
        Ok(Some(r)) => r.get::<_, i64>(0),
        Ok(None) => -1,
        Err(e)
            if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&SqlState::UNDEFINED_COLUMN) =>
        {
            -1
        }
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// Every (topic, partition, offset) in the raw log, with how often it appears.
pub async fn raw_coords(client: &Client) -> Vec<(String, i32, i64, i64)> {
    client
        .query(
            "SELECT kafka_topic, kafka_partition, kafka_offset, count(*) FROM cdc_raw.cdc_events GROUP BY 1,2,3 ORDER BY 1,2,3",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// A stream of order envelopes in the seeds' schemaless format: each order is created, shipped,
/// and every tenth one deleted. Returns the records and the final status per order id.
pub fn order_stream(prefix: &str, orders: usize) -> (Vec<Fixture>, BTreeMap<String, String>) {
    let mut records = Vec::new();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut lsn = 40_000_000i64;
    let mut next_offset = [0i64; 4];
    let mut push = |id: &str,
                    op: &str,
                    status: Option<&str>,
                    lsn: i64,
                    records: &mut Vec<Fixture>| {
        let partition = (id.bytes().map(u32::from).sum::<u32>() % 4) as i32;
        let row = |s: &str| {
            format!(
                r#"{{"id":"{id}","user_id":"u1","total":12.5,"status":"{s}","created_at":1709375445123}}"#
            )
        };
        let (before, after) = match (op, status) {
            ("d", _) => (
                format!(
                    r#"{{"id":"{id}","user_id":null,"total":null,"status":null,"created_at":null}}"#
                ),
                "null".to_string(),
            ),
            (_, Some(s)) => ("null".to_string(), row(s)),
            _ => unreachable!(),
        };
        let value = format!(
            r#"{{"before":{before},"after":{after},"source":{{"version":"3.6.3.Final","connector":"postgresql","name":"{prefix}","ts_ms":1795239028962,"snapshot":"false","db":"ecomdb","sequence":"[\"{lsn}\",\"{lsn}\"]","schema":"public","table":"orders","txId":766,"lsn":{lsn},"xmin":null}},"transaction":null,"op":"{op}","ts_ms":1795239029422}}"#
        );
        records.push(Fixture {
            topic: format!("{prefix}.public.orders"),
            partition,
            offset: next_offset[partition as usize],
            key: Some(format!(r#"{{"id":"{id}"}}"#)),
            value: Some(value),
        });
        next_offset[partition as usize] += 1;
    };
    for i in 0..orders {
        let id = format!("00000000-0000-0000-0000-{i:012}");
        lsn += 100;
        push(&id, "c", Some("CONFIRMED"), lsn, &mut records);
        last.insert(id.clone(), "CONFIRMED".into());
    }
    for i in 0..orders {
        let id = format!("00000000-0000-0000-0000-{i:012}");
        lsn += 100;
        if i % 10 == 0 {
            push(&id, "d", None, lsn, &mut records);
            last.remove(&id);
        } else {
            push(&id, "u", Some("SHIPPED"), lsn, &mut records);
            last.insert(id.clone(), "SHIPPED".into());
        }
    }
    (records, last)
}
