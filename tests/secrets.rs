//! Credentials never appear in a log line or in printed output: the pod binary runs at debug
//! level against the real stack (PostgreSQL password file, S3 secret file), a sink that cannot
//! connect, and `check-config`; every byte it prints is searched for the secrets.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const PG_SECRET: &str = "pg-Secret-4b7c1e9d-never-logged";
const S3_SECRET: &str = "s3-Secret-9f2a6d0c-never-logged";

fn secret_file(name: &str, value: &str) -> String {
    let path = std::env::temp_dir().join(unique(name));
    std::fs::write(&path, value).unwrap();
    path.display().to_string()
}

fn pod_command(topic_prefix: &str, pg_url: &str) -> Command {
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
        .env("CDC_LAKE__HTTP__LISTEN", "")
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

/// Runs the pod for a while (it ingests the samples and writes the S3 lake), then SIGTERM.
fn run_pod_for(mut cmd: Command, seconds: u64) -> String {
    let child = cmd
        .arg("ingest")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(seconds));
    sigterm(child.id());
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sigterm(pid: u32) {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_in_any_log_line() {
    let prefix = unique("sec").replace('_', "-");
    let mut records = load_fixture("bookstore-defaults.ndjson");
    retopic(&mut records, &prefix);
    produce(&records).await;
    let db = fresh_db("secrets").await;

    // A working pod: connects, migrates, ingests, uploads to S3, at debug level.
    let output = run_pod_for(pod_command(&prefix, &db), 8);
    let client = pg(&db).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM cdc_raw.cdc_events").await,
        records.len() as i64,
        "the pod ran for real:\n{output}"
    );
    assert!(output.contains("DEBUG"), "debug logging was on");
    assert_no_secret("the running pod", &output);

    // A pod whose database is unreachable logs connection errors, still without the password.
    let output = run_pod_for(
        pod_command(&prefix, "postgres://postgres@127.0.0.1:1/nowhere"),
        3,
    );
    assert!(output.contains("127.0.0.1:1"), "{output}");
    assert_no_secret("a pod failing to connect", &output);

    // check-config shows that secrets are set, never what they are.
    let out = pod_command(&prefix, &db)
        .arg("check-config")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(printed.contains("redacted"), "{printed}");
    assert_no_secret("check-config", &printed);
}
