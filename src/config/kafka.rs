//! The `[kafka]` section: the brokers, the group, the topics and how their records are
//! encoded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{RecordFormat, SchemaRegistryConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    pub brokers: String,
    /// Consumer group; also the name sink checkpoints are stored under unless
    /// `checkpoint_name` is set.
    #[serde(default = "default_group")]
    pub group_id: String,
    /// The name sink checkpoints are stored under, when it is not the group's: a pod can then
    /// move to a new consumer group (a fresh group after a broker's group state went bad)
    /// and resume every sink exactly where it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_name: Option<String>,
    /// Topic names, or regexes when they start with `^` (librdkafka's convention).
    pub topics: Vec<String>,
    /// Extra librdkafka properties (e.g. `session.timeout.ms`, SASL settings).
    #[serde(default, deserialize_with = "properties_as_strings")]
    pub properties: BTreeMap<String, String>,
    /// How record keys and values are encoded: `json`, `avro` or `auto`.
    #[serde(default)]
    pub format: RecordFormat,
    /// Where Avro writer schemas come from; required for `avro` and `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_registry: Option<SchemaRegistryConfig>,
}

/// librdkafka takes every property as a string; accept `6000` and `true` as well as `"6000"`.
fn properties_as_strings<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, toml::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| match v {
            toml::Value::String(s) => Ok((k, s)),
            toml::Value::Integer(i) => Ok((k, i.to_string())),
            toml::Value::Boolean(b) => Ok((k, b.to_string())),
            toml::Value::Float(f) => Ok((k, f.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "kafka.properties.{k} must be a string, number or boolean, not {}",
                other.type_str()
            ))),
        })
        .collect()
}

impl KafkaConfig {
    /// The consumer name sink checkpoints are stored under.
    pub fn checkpoint_name(&self) -> &str {
        self.checkpoint_name.as_deref().unwrap_or(&self.group_id)
    }
}

fn default_group() -> String {
    "cdc-lake".into()
}
