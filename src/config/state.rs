//! `[postgres]`, `[raw]`, `[state]` and `[targets.<name>]`: where the raw log and the current-state
//! targets live and how changes apply to them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{MappingConfig, Secret};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/db`. Put the password in `password_file`, not here.
    pub url: String,
    /// File holding the password (e.g. a mounted Kubernetes Secret).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(skip)]
    pub password: Option<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub enabled: bool,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// What a delete does to a state target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeleteMode {
    /// Remove the row.
    Delete,
    /// Keep the row with `cdc_deleted = true`.
    Soft,
    /// Keep the row as it was (append-only targets).
    Ignore,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub enabled: bool,
    /// Schema holding the mirror tables.
    pub schema: String,
    pub delete_mode: DeleteMode,
    /// Key columns for source tables without a primary key, by `schema.table`. Changes of a
    /// keyless table without an entry here are rejected with a reason saying so.
    pub key_columns: BTreeMap<String, Vec<String>>,
    /// Mirror name template over `{server} {db} {schema} {table}` (crate::naming). Unset: the
    /// table for `public`, `schema.table` otherwise, and one source database per mirror.
    pub table_name: Option<String>,
    /// SQL types for mirror columns of schemaless sources, by `schema.table` then column
    /// (`created_at = "timestamptz"`): used when the column is created, and schemaless values
    /// are converted to them (as to any existing column's type; crate::sink::coerce).
    pub column_types: BTreeMap<String, BTreeMap<String, String>>,
    /// The connector's `time.precision.mode`: the unit of schemaless epoch numbers.
    pub time_precision_mode: TimePrecisionMode,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            schema: "cdc_processed".into(),
            delete_mode: DeleteMode::Delete,
            key_columns: BTreeMap::new(),
            table_name: None,
            column_types: BTreeMap::new(),
            time_precision_mode: TimePrecisionMode::Adaptive,
        }
    }
}

/// A named current-state target: mirrors in a schema of any database, with its own checkpoint
/// in that database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// The target database; `[postgres]` when omitted.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(skip)]
    pub password: Option<Secret>,
    /// True: the ingest pod keeps this target current. False: only `cdc-replay` writes it.
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_state_schema")]
    pub schema: String,
    #[serde(default = "default_delete_mode")]
    pub delete_mode: DeleteMode,
    /// As `state.key_columns`, for this target.
    #[serde(default)]
    pub key_columns: BTreeMap<String, Vec<String>>,
    /// As `state.table_name`, for this target.
    #[serde(default)]
    pub table_name: Option<String>,
    /// As `state.column_types`, for this target.
    #[serde(default)]
    pub column_types: BTreeMap<String, BTreeMap<String, String>>,
    /// As `state.time_precision_mode`, for this target.
    #[serde(default)]
    pub time_precision_mode: TimePrecisionMode,
    /// SQL files run (in order) whenever the target is opened: the tables the mappings write
    /// and the views over them. They must be idempotent (`IF NOT EXISTS`, `OR REPLACE`).
    /// Relative paths start at the config file's directory (the working directory for the
    /// embedded defaults).
    #[serde(default)]
    pub setup_sql: Vec<PathBuf>,
    /// Declarative topic→table mappings. A target with mappings writes only what they map;
    /// one without mirrors every source table.
    #[serde(default)]
    pub mappings: Vec<MappingConfig>,
    #[serde(skip)]
    pub setup_sql_resolved: Vec<PathBuf>,
}

/// Debezium's `time.precision.mode`, which says what unit schemaless epoch numbers are in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimePrecisionMode {
    /// Debezium's default: `timestamp(0..3)` and `time(0..3)` in milliseconds, higher
    /// precisions in microseconds.
    #[default]
    Adaptive,
    /// As `adaptive`, but every `time` in microseconds.
    AdaptiveTimeMicroseconds,
    /// Kafka Connect's types: every time and timestamp in milliseconds (the seeds' setting).
    Connect,
}

fn yes() -> bool {
    true
}
fn default_state_schema() -> String {
    StateConfig::default().schema
}
pub(super) fn default_delete_mode() -> DeleteMode {
    StateConfig::default().delete_mode
}

/// The name of the `[state]` target, for `cdc-replay --target`.
pub const PROCESSED_TARGET: &str = "processed";

/// A current-state target resolved against `[postgres]`: where it lives and how it applies.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub postgres: PostgresConfig,
    pub state: StateConfig,
    /// SQL files run when the target is opened.
    pub setup_sql: Vec<PathBuf>,
    pub mappings: Vec<MappingConfig>,
}

impl Target {
    /// The name its checkpoint rows use: `state` for `[state]`, `state:<name>` otherwise.
    pub fn sink_name(&self) -> String {
        if self.name == PROCESSED_TARGET {
            "state".into()
        } else {
            format!("state:{}", self.name)
        }
    }
}
