//! A client for a Confluent-compatible Schema Registry, kept to the documented API that
//! Confluent Schema Registry, Karapace, Apicurio's ccompat API and Redpanda all serve: writer
//! schemas by id (`GET /schemas/ids/{id}`). A schema id never changes its schema, so each is
//! fetched once and kept for the pod's life; an outage only delays ids not seen before.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::{SchemaRegistryConfig, Secret};
use crate::envelope::avro::{Lookup, WriterSchema};

/// The registry cannot answer now (down, slow, refusing our credentials): the record waits
/// and is tried again. Never a reason to reject or skip.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the schema registry cannot answer for schema id {id}: {reason}")]
pub struct RegistryUnavailable {
    pub id: u32,
    pub reason: String,
}

/// Registering a schema (`POST /subjects/{subject}/versions`) did not give an id.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegisterError {
    /// The registry refuses this schema under this subject (409: incompatible with the
    /// subject's earlier versions; 422: invalid). Retrying the same schema cannot help.
    #[error("the schema registry refuses the schema under subject {subject}: {reason}")]
    Refused { subject: String, reason: String },
    /// The registry cannot answer now: retry.
    #[error("the schema registry cannot register under subject {subject}: {reason}")]
    Unavailable { subject: String, reason: String },
}

/// The body of `GET /schemas/ids/{id}`.
#[derive(Deserialize)]
struct SchemaById {
    schema: String,
    /// Absent for Avro (the registry's default type).
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<serde_json::Value>,
}

pub struct SchemaRegistry {
    http: reqwest::Client,
    urls: Vec<String>,
    auth: Option<(String, Secret)>,
    /// Runs the requests; the poll thread is not a runtime thread, so it blocks on them.
    runtime: tokio::runtime::Handle,
    known: HashMap<u32, Arc<WriterSchema>>,
}

impl SchemaRegistry {
    pub fn new(
        cfg: &SchemaRegistryConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, String> {
        let mut http = reqwest::Client::builder()
            .timeout(cfg.request_timeout.0)
            .user_agent(concat!("cdc-lake/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                format!(
                    "cannot read kafka.schema_registry.ca_file {}: {e}",
                    path.display()
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "kafka.schema_registry.ca_file {} holds no PEM certificate: {e}",
                    path.display()
                )
            })?;
            if certs.is_empty() {
                return Err(format!(
                    "kafka.schema_registry.ca_file {} holds no PEM certificate",
                    path.display()
                ));
            }
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http
            .build()
            .map_err(|e| format!("cannot build the schema registry client: {e}"))?;
        let auth = match (&cfg.username, &cfg.password) {
            (Some(user), Some(password)) => Some((user.clone(), password.clone())),
            _ => None,
        };
        Ok(Self {
            http,
            urls: cfg
                .urls
                .iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect(),
            auth,
            runtime,
            known: HashMap::new(),
        })
    }

    /// The writer schema of `id`: from the cache, or fetched (blocking the calling thread,
    /// which must not be a runtime thread).
    pub fn lookup(&mut self, id: u32) -> Result<Lookup, RegistryUnavailable> {
        if let Some(known) = self.known.get(&id) {
            return Ok(Lookup::Found(known.clone()));
        }
        let fetched = self.runtime.block_on(self.fetch(id))?;
        if let Lookup::Found(schema) = &fetched {
            self.known.insert(id, schema.clone());
        }
        Ok(fetched)
    }

    /// A request with the registry's media type and our credentials.
    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, url).header(
            reqwest::header::ACCEPT,
            "application/vnd.schemaregistry.v1+json",
        );
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password.expose()));
        }
        request
    }

    /// Registers `schema` (Avro schema JSON) under `subject`, or finds it registered there,
    /// and returns its id (`POST /subjects/{subject}/versions`, which answers with the
    /// existing id when the subject already holds the schema).
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegisterError> {
        #[derive(Deserialize)]
        struct Registered {
            id: u32,
        }
        let body = serde_json::json!({ "schema": schema }).to_string();
        let mut failures = Vec::new();
        for base in &self.urls {
            let request = self
                .request(
                    reqwest::Method::POST,
                    format!("{base}/subjects/{subject}/versions"),
                )
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/vnd.schemaregistry.v1+json",
                )
                .body(body.clone());
            let (status, answer) = match request.send().await {
                Ok(r) => (r.status(), r.bytes().await),
                Err(e) => {
                    failures.push(format!("{base}: {e}"));
                    continue;
                }
            };
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    failures.push(format!("{base}: reading the response: {e}"));
                    continue;
                }
            };
            match status.as_u16() {
                200 => match serde_json::from_slice::<Registered>(&answer) {
                    Ok(r) => return Ok(r.id),
                    Err(e) => failures.push(format!("{base}: the answer has no id: {e}")),
                },
                409 | 422 => {
                    return Err(RegisterError::Refused {
                        subject: subject.into(),
                        reason: format!("HTTP {status} from {base}: {}", error_message(&answer)),
                    })
                }
                401 | 403 => failures.push(format!(
                    "{base}: HTTP {status}; check kafka.schema_registry.username and password_file"
                )),
                _ => failures.push(format!("{base}: HTTP {status}: {}", error_message(&answer))),
            }
        }
        Err(RegisterError::Unavailable {
            subject: subject.into(),
            reason: failures.join("; "),
        })
    }

    /// Asks each URL in turn; the first definite answer (the schema, or that the id is
    /// unknown) wins.
    async fn fetch(&self, id: u32) -> Result<Lookup, RegistryUnavailable> {
        let mut failures = Vec::new();
        for base in &self.urls {
            let request = self.request(reqwest::Method::GET, format!("{base}/schemas/ids/{id}"));
            let response = match request.send().await {
                Ok(r) => r,
                // reqwest's errors name the URL, never the credentials (they are a header).
                Err(e) => {
                    failures.push(format!("{base}: {e}"));
                    continue;
                }
            };
            let status = response.status();
            let body = match response.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    failures.push(format!("{base}: reading the response: {e}"));
                    continue;
                }
            };
            match status.as_u16() {
                200 => return Ok(parse_schema(id, &body)),
                404 => {
                    return Ok(Lookup::Unknown(format!(
                        "the registry does not know it (HTTP 404 from {base}: {})",
                        error_message(&body)
                    )))
                }
                401 | 403 => failures.push(format!(
                    "{base}: HTTP {status}; check kafka.schema_registry.username and password_file"
                )),
                _ => failures.push(format!("{base}: HTTP {status}: {}", error_message(&body))),
            }
        }
        Err(RegistryUnavailable {
            id,
            reason: failures.join("; "),
        })
    }
}

/// A 200 answer: a schema cdc-lake can decode with, or the reason it cannot, which no retry
/// changes (an id's schema is fixed).
fn parse_schema(id: u32, body: &[u8]) -> Lookup {
    let answer: SchemaById = match serde_json::from_slice(body) {
        Ok(a) => a,
        Err(e) => return Lookup::Unknown(format!("the registry's answer is not a schema: {e}")),
    };
    if let Some(kind) = answer.schema_type.filter(|t| t != "AVRO") {
        return Lookup::Unknown(format!("it is a {kind} schema, not Avro"));
    }
    if !answer.references.is_empty() {
        return Lookup::Unknown(
            "it uses schema references, which cdc-lake does not resolve".into(),
        );
    }
    match WriterSchema::parse(id, &answer.schema) {
        Ok(schema) => Lookup::Found(Arc::new(schema)),
        Err(e) => Lookup::Unknown(e.to_string()),
    }
}

/// The `message` of a registry error body (`{"error_code": 40403, "message": "..."}`), or
/// the start of the body.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_schemas_or_permanent_reasons() {
        let ok = br#"{"schema":"{\"type\":\"record\",\"name\":\"R\",\"fields\":[{\"name\":\"a\",\"type\":\"int\"}]}"}"#;
        assert!(matches!(parse_schema(1, ok), Lookup::Found(s) if s.id() == 1));
        let cases: [(&[u8], &str); 4] = [
            (
                br#"{"schema":"{}","schemaType":"PROTOBUF"}"#,
                "PROTOBUF schema",
            ),
            (
                br#"{"schema":"\"int\"","references":[{"name":"x","subject":"s","version":1}]}"#,
                "schema references",
            ),
            (br#"{"schema":"{nope"}"#, "not JSON"),
            (b"<html>", "not a schema"),
        ];
        for (body, want) in cases {
            match parse_schema(7, body) {
                Lookup::Unknown(reason) => assert!(reason.contains(want), "{want}: {reason}"),
                Lookup::Found(_) => panic!("{want}: parsed"),
            }
        }
        assert_eq!(
            error_message(br#"{"error_code":40403,"message":"Schema 9 not found"}"#),
            "Schema 9 not found"
        );
    }
}
