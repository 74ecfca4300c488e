//! The Schema Registry client's HTTP behaviour, against a scripted HTTP server on loopback
//! (the dev stack's registry stand-in has no auth and never fails on purpose, so these cases
//! are scripted here; `tests/avro.rs` runs the client against the stand-in itself):
//! basic auth from the password file, failover across URLs, 404 as a permanent answer, 5xx and
//! refused connections as "cannot answer now", and schemas kept once fetched. TLS runs against a
//! real HTTPS server (Python's `ssl` with certificates from `openssl`): a registry whose
//! certificate is signed by the CA in `ca_file` is trusted, and without it refused.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdc_lake::config::{HumanDuration, SchemaRegistryConfig, Secret};
use cdc_lake::envelope::avro::Lookup;
use cdc_lake::source::registry::SchemaRegistry;

const SCHEMA: &str = r#"{"schema":"{\"type\":\"record\",\"name\":\"R\",\"fields\":[{\"name\":\"a\",\"type\":\"int\"}]}"}"#;

/// Each request's line and its Authorization header, as the server saw them.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A server that answers each request with the next scripted `(status, body)` and records the
/// request line and the Authorization header.
struct Scripted {
    url: String,
    seen: Seen,
}

fn scripted(answers: Vec<(u16, &'static str)>) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (status, body) in answers {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut auth = None;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some(v) = header.strip_prefix("authorization: ") {
                    auth = Some(v.trim().to_string());
                }
            }
            log.lock().unwrap().push((line.trim().to_string(), auth));
            let mut stream = reader.into_inner();
            write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let _ = stream.flush();
        }
    });
    Scripted { url, seen }
}

fn registry(urls: Vec<String>, auth: bool) -> (tokio::runtime::Runtime, SchemaRegistry) {
    registry_with_ca(urls, auth, None)
}

fn registry_with_ca(
    urls: Vec<String>,
    auth: bool,
    ca_file: Option<std::path::PathBuf>,
) -> (tokio::runtime::Runtime, SchemaRegistry) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cfg = SchemaRegistryConfig {
        urls,
        username: auth.then(|| "key".to_string()),
        password_file: None,
        password: auth.then(|| Secret::new("s3cret")),
        ca_file,
        request_timeout: HumanDuration(Duration::from_secs(5)),
    };
    let client = SchemaRegistry::new(&cfg, runtime.handle().clone()).unwrap();
    (runtime, client)
}

/// A port nothing listens on.
fn refused() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

#[test]
fn schemas_are_fetched_with_basic_auth_and_kept() {
    let server = scripted(vec![(200, SCHEMA)]);
    let (_rt, mut client) = registry(vec![server.url.clone()], true);
    let Ok(Lookup::Found(schema)) = client.lookup(7) else {
        panic!("schema 7 not found")
    };
    assert_eq!(schema.id(), 7);
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "GET /schemas/ids/7 HTTP/1.1");
    // base64("key:s3cret")
    assert_eq!(seen[0].1.as_deref(), Some("Basic a2V5OnMzY3JldA=="));
    // The server answers once; the schema is kept, so a later lookup needs no registry.
    assert!(matches!(client.lookup(7), Ok(Lookup::Found(_))));
}

#[test]
fn unknown_ids_are_answers_and_failures_are_not() {
    let server = scripted(vec![
        (
            404,
            r#"{"error_code":40403,"message":"Schema 9 not found"}"#,
        ),
        (500, r#"{"error_code":50001,"message":"store down"}"#),
        (401, r#"{"error_code":401,"message":"Unauthorized"}"#),
    ]);
    let (_rt, mut client) = registry(vec![server.url.clone()], false);
    match client.lookup(9) {
        Ok(Lookup::Unknown(reason)) => {
            assert!(
                reason.contains("404") && reason.contains("Schema 9 not found"),
                "{reason}"
            )
        }
        _ => panic!("a 404 is the answer that the id is unknown"),
    }
    let e = client.lookup(9).err().expect("a 500 is not an answer");
    assert!(
        e.to_string().contains("HTTP 500") && e.to_string().contains("store down"),
        "{e}"
    );
    let e = client.lookup(9).err().expect("a 401 is not an answer");
    assert!(e.to_string().contains("password_file"), "{e}");
    let e = registry(vec![refused()], false).1.lookup(1).err();
    assert!(e.is_some(), "a refused connection is not an answer");
}

#[test]
fn the_next_url_answers_when_the_first_cannot() {
    let server = scripted(vec![(200, SCHEMA)]);
    let (_rt, mut client) = registry(vec![refused(), server.url.clone()], false);
    assert!(matches!(client.lookup(3), Ok(Lookup::Found(s)) if s.id() == 3));
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An HTTPS server on loopback that answers every GET with [`SCHEMA`], its certificate signed
/// by a CA of its own: the server's URL, the CA's PEM file, and the server process.
fn https_registry(dir: &std::path::Path) -> (String, std::path::PathBuf, std::process::Child) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=cdc-lake test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    let server = format!(
        r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {SCHEMA:?}.encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("server.pem", "server.key")
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
"#
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &server])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is installed");
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let url = format!("https://127.0.0.1:{}", port.trim());
    (url, dir.join("ca.pem"), child)
}

#[test]
fn a_registry_behind_tls_is_trusted_through_its_ca_file() {
    let dir = std::env::temp_dir().join(format!("cdc-lake-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (url, ca, mut server) = https_registry(&dir);
    let (_rt, mut trusting) = registry_with_ca(vec![url.clone()], false, Some(ca));
    let found = trusting.lookup(3);
    let (_rt2, mut plain) = registry(vec![url], false);
    let refused = plain.lookup(3);
    let _ = server.kill();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        matches!(found, Ok(Lookup::Found(ref s)) if s.id() == 3),
        "the CA in ca_file makes the registry's certificate trusted: {:?}",
        found.err()
    );
    // Without the CA the certificate is unknown: the registry cannot answer (the record
    // waits), which is not a reason to reject.
    assert!(refused.is_err(), "an untrusted certificate is refused");
}
