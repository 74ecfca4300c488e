//! The Schema Registry client's HTTP behaviour, against a scripted HTTP server on loopback
//! (the dev stack's registry stand-in has no auth and never fails on purpose, so these cases
//! are scripted here; `tests/avro.rs` runs the client against the stand-in itself):
//! basic auth from the password file, failover across URLs, 404 as a permanent answer, 5xx and
//! refused connections as "cannot answer now", and schemas kept once fetched.

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
        ca_file: None,
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
