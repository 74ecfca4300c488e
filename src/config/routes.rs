//! The `[routes]` section: routing matching changes to consumer topics (docs/routing.md).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesConfig {
    /// The filter definitions (`routes.yaml`); empty: no routing.
    pub file: String,
    /// What to do when a filter's output topic does not exist: `create` it with the source
    /// topic's partition count, or stop with an `error` (topics managed elsewhere).
    pub missing_topic: MissingTopic,
    /// Replication factor of output topics the pod creates.
    pub replication_factor: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingTopic {
    Create,
    Error,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        Self {
            file: String::new(),
            missing_topic: MissingTopic::Create,
            replication_factor: 1,
        }
    }
}

impl RoutesConfig {
    pub fn enabled(&self) -> bool {
        !self.file.is_empty()
    }
}
