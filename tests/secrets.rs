//! Credentials and row values never appear in a log line or in printed output: the pod binary
//! runs at debug level against the real stack (PostgreSQL password file, S3 secret file), a
//! sink that cannot connect, poison rows carrying a marker value, and `check-config`; every
//! byte it prints is searched for the secrets and the marker.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const PG_SECRET: &str = "pg-Secret-4b7c1e9d-never-logged";
const S3_SECRET: &str = "s3-Secret-9f2a6d0c-never-logged";

fn secret_file(name: &str, value: &str) -> String {
    let path = std::env::temp_dir().join(unique(name));
    std::fs::write(&path, value).unwrap();
    path.display().to_string()
}

fn pod_command(topic_prefix: &str, pg_url: &str, http_listen: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdc-lake"));
    cmd.env("RUST_LOG", "debug")
        .env("CDC_LAKE__KAFKA__BROKERS", broker())
        .env("CDC_LAKE__KAFKA__GROUP_ID", unique("secrets"))
        .env(
            "CDC_LAKE__KAFKA__TOPICS",
            format!("['^{}\\..*']", topic_prefix),
        )
        .env("CDC_LAKE__POSTGRES__URL", pg_url)
        .env(
            "CDC_LAKE__POSTGRES__PASSWORD_FILE",
            secret_file("pgpw", PG_SECRET),
        )
        .env("CDC_LAKE__HTTP__LISTEN", http_listen)
        .env("CDC_LAKE__TARGETS", "{}")
        .env("CDC_LAKE__LAKE__PREFIX", unique("secrets"))
        .env("CDC_LAKE__LAKE__S3__BUCKET", "cdc-lake")
        .env("CDC_LAKE__LAKE__S3__ENDPOINT", s3_endpoint())
        .env("CDC_LAKE__LAKE__S3__ALLOW_HTTP", "true")
        .env("CDC_LAKE__LAKE__S3__ACCESS_KEY_ID", "testing")
        .env(
            "CDC_LAKE__LAKE__S3__SECRET_ACCESS_KEY_FILE",
            secret_file("s3pw", S3_SECRET),
        )
        .env("CDC_LAKE__LAKE__ROLL_AGE", "1s");
    cmd
}

fn assert_no_secret(what: &str, output: &str) {
    for s in [PG_SECRET, S3_SECRET] {
        assert!(
            !output.contains(s),
            "{what} printed a credential:\n{output}"
        );
    }
}

/// The pod binary as a child process, its output collected as it prints: a pipe nobody reads
/// would block the pod's logging once full.
struct PodProcess {
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl PodProcess {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .arg("ingest")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        let readers = [stdout, stderr]
            .into_iter()
            .map(|mut pipe| {
                let output = output.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    while let Ok(n @ 1..) = pipe.read(&mut buf) {
                        output
                            .lock()
                            .unwrap()
                            .push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                })
            })
            .collect();
        PodProcess {
            child,
            output,
            readers,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until `done` holds (it gets what the pod printed so far), or fails the test with
    /// that output after `timeout`.
    fn wait_until(&self, what: &str, timeout: Duration, mut done: impl FnMut(&str) -> bool) {
        let start = Instant::now();
        while !done(&self.output()) {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then everything the pod printed.
    fn stop(mut self) -> String {
        sigterm(self.child.id());
        self.child.wait().unwrap();
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        self.output()
    }
}

/// A test that fails while its pod runs leaves no pod behind.
impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free local port for the pod's HTTP server.
fn metrics_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Runs the pod until it has committed `records` records (its own `/metrics`: every sink,
/// the S3 lake too, has stored or rejected each one), then SIGTERM; returns what it printed.
fn run_pod_until_committed(cmd: Command, metrics: &str, records: usize) -> String {
    let pod = PodProcess::start(cmd);
    pod.wait_until(
        &format!("the pod to commit {records} records"),
        Duration::from_secs(60),
        |_| {
            try_http_get(metrics, "/metrics").is_ok_and(|(_, body)| {
                metric_total(&body, "cdc_lake_committed_offset") >= records as f64
            })
        },
    );
    pod.stop()
}

fn sigterm(pid: u32) {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}

#[test]
fn no_credential_in_any_log_line() {
    run_test(async {
        let prefix = unique("sec").replace('_', "-");
        let mut records = load_fixture("bookstore-defaults.ndjson");
        retopic(&mut records, &prefix);
        produce(&records).await;
        let db = fresh_db("secrets").await;

        // A working pod: connects, migrates, ingests, uploads to S3, at debug level.
        let metrics = metrics_address();
        let output =
            run_pod_until_committed(pod_command(&prefix, &db, &metrics), &metrics, records.len());
        let client = pg(&db).await;
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await,
            records.len() as i64,
            "the pod ran for real:\n{output}"
        );
        assert!(output.contains("DEBUG"), "debug logging was on");
        assert_no_secret("the running pod", &output);
        assert!(
            !output.contains('\u{1b}'),
            "a log that goes to a pipe has no terminal colour codes:\n{output}"
        );

        // A pod whose database is unreachable logs connection errors, still without the password.
        let pod = PodProcess::start(pod_command(
            &prefix,
            "postgres://postgres@127.0.0.1:1/nowhere",
            "",
        ));
        pod.wait_until(
            "the pod to log its connection error",
            Duration::from_secs(30),
            |printed| printed.contains("127.0.0.1:1"),
        );
        let output = pod.stop();
        assert_no_secret("a pod failing to connect", &output);

        // check-config shows that secrets are set, never what they are.
        let out = pod_command(&prefix, &db, "")
            .arg("check-config")
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(printed.contains("redacted"), "{printed}");
        assert_no_secret("check-config", &printed);
    });
}

/// A value planted in rows that every sink handles on its error paths (a mirror column that
/// cannot take it, a NUL the raw log cannot store, a value in a reject row) must not show up in
/// any output at debug level.
#[test]
fn no_row_value_in_any_log_line_at_debug_level() {
    run_test(async {
        const MARKER: &str = "ROWVALUE-123-45-6789-alice@example.com";
        let prefix = unique("rowlog").replace('_', "-");
        let topic = format!("{prefix}.public.people");
        let envelope_of = |table: &str, after: String, lsn: i64| {
            format!(
                r#"{{"before":null,"after":{after},"source":{{"name":"rowlog","ts_ms":1795239028962,"snapshot":"false","db":"ecomdb","sequence":"[\"{lsn}\",\"{lsn}\"]","schema":"public","table":"{table}","txId":1,"lsn":{lsn}}},"op":"c","ts_ms":1795239029422}}"#
            )
        };
        let envelope = |after: String, lsn: i64| envelope_of("people", after, lsn);
        let rec = |key: &str, value: String| Fixture {
            topic: topic.clone(),
            partition: 0,
            offset: 0,
            key: Some(key.into()),
            value: Some(value),
        };
        let records = vec![
            // Makes `ssn` a bigint column.
            rec(r#"{"id":1}"#, envelope(r#"{"id":1,"ssn":1}"#.into(), 100)),
            // Text for a bigint column: PostgreSQL's message would quote it.
            rec(
                r#"{"id":2}"#,
                envelope(format!(r#"{{"id":2,"ssn":"{MARKER}"}}"#), 200),
            ),
            // A NUL next to the marker (another table, so each failure is the first of its
            // table's batch and gets logged): the raw log rejects the row with its bytes.
            rec(
                r#"{"id":3}"#,
                envelope_of(
                    "notes",
                    format!(r#"{{"id":3,"note":"{MARKER}\u0000"}}"#),
                    300,
                ),
            ),
            rec(r#"{"id":4}"#, envelope(r#"{"id":4,"ssn":4}"#.into(), 400)),
        ];
        produce(&records).await;
        let db = fresh_db("rowlog").await;
        let metrics = metrics_address();
        let output =
            run_pod_until_committed(pod_command(&prefix, &db, &metrics), &metrics, records.len());
        let client = pg(&db).await;
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_processed.people").await,
            2,
            "the healthy rows applied:\n{output}"
        );
        assert_eq!(
            count(&client, "SELECT count(*) FROM cdc_raw.cdc_rejects").await,
            3,
            "one raw-stage and two state-stage rejects:\n{output}"
        );
        assert!(output.contains("DEBUG"), "debug logging was on");
        assert!(
            !output.contains(MARKER) && !output.contains("123-45-6789"),
            "a row value reached the logs:\n{output}"
        );
    });
}
