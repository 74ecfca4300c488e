//! How records are encoded on the wire, and the Schema Registry that Avro records need.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HumanDuration, Secret};

/// How record keys and values are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// Debezium's JsonConverter, with or without the `{schema, payload}` wrapper.
    #[default]
    Json,
    /// Confluent-framed Avro (magic byte 0, a schema id, the datum), with a Schema Registry.
    Avro,
    /// Either, told apart per record by the first byte: framed Avro starts with 0, JSON never.
    Auto,
}

impl RecordFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordFormat::Json => "json",
            RecordFormat::Avro => "avro",
            RecordFormat::Auto => "auto",
        }
    }

    /// Whether records of this format can need a writer schema from the registry.
    pub fn reads_avro(self) -> bool {
        matches!(self, RecordFormat::Avro | RecordFormat::Auto)
    }
}

/// A Confluent-compatible Schema Registry (Confluent, Karapace, Apicurio's ccompat API,
/// Redpanda). cdc-lake only reads writer schemas by id (`GET /schemas/ids/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// Base URLs of the registry's instances; each request tries them in order.
    pub urls: Vec<String>,
    /// Basic-auth user (Confluent Cloud: the API key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// A file holding the basic-auth password (Confluent Cloud: the API secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(skip)]
    pub password: Option<Secret>,
    /// A PEM file of CA certificates to trust for `https` URLs, besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// How long one request may take before the next URL, or a later retry, is tried.
    #[serde(default = "default_registry_timeout")]
    pub request_timeout: HumanDuration,
}

fn default_registry_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

impl SchemaRegistryConfig {
    /// Checks what can be checked offline.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.urls.is_empty() {
            return bad("kafka.schema_registry.urls lists no URL".into());
        }
        for url in &self.urls {
            let Some((scheme, rest)) = url.split_once("://") else {
                return bad(format!(
                    "kafka.schema_registry.urls: {url:?} is not an http:// or https:// URL"
                ));
            };
            if scheme != "http" && scheme != "https" {
                return bad(format!(
                    "kafka.schema_registry.urls: {url:?} is not an http:// or https:// URL"
                ));
            }
            if rest
                .split('/')
                .next()
                .is_some_and(|host| host.contains('@'))
            {
                return bad(
                    "kafka.schema_registry.urls must not hold credentials; use username and \
                     password_file"
                        .into(),
                );
            }
        }
        if self.username.is_some() != self.password_file.is_some() {
            return bad(
                "kafka.schema_registry needs both username and password_file, or neither".into(),
            );
        }
        if self.request_timeout.0.is_zero() {
            return bad("kafka.schema_registry.request_timeout must be more than 0".into());
        }
        Ok(())
    }
}
