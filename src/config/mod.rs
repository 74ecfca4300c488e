//! Configuration: a TOML file, then `CDC_LAKE__SECTION__KEY` environment overrides, then secrets
//! from `*_file` paths, then [`Config::validate`]. Secrets are never printed: see
//! [`Config::redacted`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid TOML: {0}")]
    Parse(String),
    #[error("environment override {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("cannot read secret file {path} (for {field}): {source}")]
    Secret {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

mod env;
mod kafka;
mod lake;
mod mapping;
mod registry;
mod routes;
mod state;
mod units;

pub use kafka::*;
pub use lake::*;
pub use mapping::*;
pub use registry::*;
pub use routes::*;
pub use state::*;
pub use units::*;

use env::apply_env_overrides;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub raw: RawConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub lake: LakeConfig,
    /// More current-state targets besides `[state]`, by name (e.g. a replica database).
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    /// Routing to consumer topics (off unless `routes.file` is set).
    #[serde(default)]
    pub routes: RoutesConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A batch closes at this many records...
    pub max_records: usize,
    /// ...or this many bytes of record values...
    pub max_bytes: ByteSize,
    /// ...or when its first record is this old.
    pub max_age: HumanDuration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: 10_000,
            max_bytes: ByteSize(16 << 20),
            max_age: HumanDuration(Duration::from_millis(50)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/healthz`, `/readyz` and `/metrics`; empty disables the server.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM, how long to drain in-flight batches before exiting anyway.
    pub drain_deadline: HumanDuration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_deadline: HumanDuration(Duration::from_secs(10)),
        }
    }
}

pub const ENV_PREFIX: &str = "CDC_LAKE__";

impl Config {
    /// Loads the file (or the embedded demo defaults when `path` is None), applies environment
    /// overrides and secret files, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => DEMO_DEFAULTS.to_string(),
        };
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env_overrides(&mut table, env)?;
        let mut config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.read_secrets()?;
        let base = match path.and_then(Path::parent) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        config.resolve_setup_sql(&base);
        config.validate()?;
        Ok(config)
    }

    fn read_secrets(&mut self) -> Result<(), ConfigError> {
        let read = |field: &'static str, path: &Path| {
            std::fs::read_to_string(path)
                .map(|s| Secret::new(s.trim_end_matches(['\n', '\r'])))
                .map_err(|source| ConfigError::Secret {
                    field,
                    path: path.to_path_buf(),
                    source,
                })
        };
        if let Some(p) = &self.postgres.password_file {
            self.postgres.password = Some(read("postgres.password_file", p)?);
        }
        for (name, t) in &mut self.targets {
            if let Some(p) = &t.password_file {
                t.password = Some(read("targets.*.password_file", p).map_err(|e| match e {
                    ConfigError::Secret { path, source, .. } => ConfigError::Invalid(format!(
                        "cannot read targets.{name}.password_file {}: {source}",
                        path.display()
                    )),
                    other => other,
                })?);
            }
        }
        if let Some(registry) = &mut self.kafka.schema_registry {
            if let Some(p) = &registry.password_file {
                registry.password = Some(read("kafka.schema_registry.password_file", p)?);
            }
        }
        if let Some(s3) = &mut self.lake.s3 {
            if let Some(p) = &s3.secret_access_key_file {
                s3.secret_access_key = Some(read("lake.s3.secret_access_key_file", p)?);
            }
        }
        Ok(())
    }

    /// Resolves each target's `setup_sql` paths against the config file's directory. The files
    /// are read when the target is opened (start-up, or a replay into it).
    fn resolve_setup_sql(&mut self, base: &Path) {
        for t in self.targets.values_mut() {
            t.setup_sql_resolved = t.setup_sql.iter().map(|p| base.join(p)).collect();
        }
    }

    /// Checks everything that can be checked without I/O.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.kafka.brokers.trim().is_empty() {
            return bad("kafka.brokers is empty".into());
        }
        if self.kafka.topics.is_empty() {
            return bad("kafka.topics lists no topic or pattern".into());
        }
        if let Some(t) = self.kafka.topics.iter().find(|t| t.trim().is_empty()) {
            return bad(format!("kafka.topics has an empty entry {t:?}"));
        }
        match (&self.kafka.schema_registry, self.kafka.format.reads_avro()) {
            (Some(registry), _) => registry.validate()?,
            (None, true) => {
                return bad(format!(
                    "kafka.format = \"{}\" needs kafka.schema_registry.urls",
                    self.kafka.format.as_str()
                ))
            }
            (None, false) => {}
        }
        if self.kafka.group_id.trim().is_empty() {
            return bad("kafka.group_id is empty".into());
        }
        for managed in ["enable.auto.commit", "enable.auto.offset.store", "group.id"] {
            if self.kafka.properties.contains_key(managed) {
                return bad(format!(
                    "kafka.properties.{managed} is managed by cdc-lake (offsets live with the data)"
                ));
            }
        }
        check_pg_url("postgres.url", &self.postgres.url)?;
        let key_tables = std::iter::once(("state", &self.state.key_columns))
            .chain(self.targets.values().map(|t| ("targets.*", &t.key_columns)));
        for (section, keys) in key_tables {
            for (table, columns) in keys {
                if !table.contains('.') || columns.is_empty() {
                    return bad(format!(
                        "{section}.key_columns.\"{table}\" needs a schema.table name and at least one column"
                    ));
                }
            }
        }
        let templates = std::iter::once(("state".to_string(), &self.state.table_name)).chain(
            self.targets
                .iter()
                .map(|(n, t)| (format!("targets.{n}"), &t.table_name)),
        );
        let column_types = std::iter::once(("state".to_string(), &self.state.column_types)).chain(
            self.targets
                .iter()
                .map(|(n, t)| (format!("targets.{n}"), &t.column_types)),
        );
        let sql_type = Regex::new(r"^[A-Za-z][A-Za-z0-9_ ,()\[\]]*$").expect("valid regex");
        for (section, tables) in column_types {
            for (table, columns) in tables {
                if !table.contains('.') {
                    return bad(format!(
                        "{section}.column_types.\"{table}\" needs a schema.table name"
                    ));
                }
                for (column, ty) in columns {
                    if !sql_type.is_match(ty) {
                        return bad(format!(
                            "{section}.column_types.\"{table}\".{column} = {ty:?} is not an SQL type name"
                        ));
                    }
                }
            }
        }
        for (section, template) in templates {
            crate::naming::MirrorNaming::from_config(template.as_deref())
                .map_err(|e| ConfigError::Invalid(format!("{section}.{e}")))?;
        }
        for (name, t) in &self.targets {
            if name == PROCESSED_TARGET || !crate::domain::is_plain_ident(name) {
                return bad(format!(
                    "targets.{name}: a target name is a plain identifier other than {PROCESSED_TARGET:?} (the [state] target)"
                ));
            }
            if let Some(url) = &t.url {
                check_pg_url(&format!("targets.{name}.url"), url)?;
            }
            if !crate::domain::is_plain_ident(&t.schema) {
                return bad(format!(
                    "targets.{name}.schema {:?} is not a plain identifier (letters, digits, _)",
                    t.schema
                ));
            }
            for (i, m) in t.mappings.iter().enumerate() {
                m.check(name, i).map_err(ConfigError::Invalid)?;
            }
        }
        if self.batch.max_records == 0 {
            return bad("batch.max_records must be at least 1".into());
        }
        if self.batch.max_bytes.0 < 1024 {
            return bad("batch.max_bytes must be at least 1KiB".into());
        }
        if self.batch.max_age.0.is_zero() {
            return bad("batch.max_age must be above 0".into());
        }
        if self.lake.roll_rows == 0 || self.lake.roll_age.0.is_zero() {
            return bad("lake.roll_rows and lake.roll_age must be above 0".into());
        }
        if !crate::domain::is_plain_ident(&self.state.schema) {
            return bad(format!(
                "state.schema {:?} is not a plain identifier (letters, digits, _)",
                self.state.schema
            ));
        }
        if let Some(s3) = &self.lake.s3 {
            if s3.bucket.is_empty() {
                return bad("lake.s3.bucket is empty".into());
            }
            if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
                return bad(
                    "lake.s3 needs both access_key_id and secret_access_key_file, or neither"
                        .into(),
                );
            }
        }
        if self.lake.compaction.every.is_some_and(|e| e.0.is_zero()) {
            return bad(
                "lake.compaction.every must be above 0 (leave it unset for no in-pod compaction)"
                    .into(),
            );
        }
        if self.lake.compaction.every.is_some() && !self.lake.enabled {
            return bad("lake.compaction.every is set but the lake is disabled".into());
        }
        if self.lake.delta.checkpoint_interval == 0 {
            return bad("lake.delta.checkpoint_interval must be above 0".into());
        }
        if self.lake.prefix.contains("..") || self.lake.prefix.starts_with('/') {
            return bad("lake.prefix must be a relative path without ..".into());
        }
        if !(self.raw.enabled || self.state.enabled || self.lake.enabled) {
            return bad("every sink is disabled; enable at least one of raw, state, lake".into());
        }
        Ok(())
    }

    /// Every current-state target: `processed` (`[state]`) first, then `[targets.*]`.
    pub fn all_targets(&self) -> Vec<Target> {
        let mut out = vec![Target {
            name: PROCESSED_TARGET.into(),
            postgres: self.postgres.clone(),
            state: self.state.clone(),
            setup_sql: Vec::new(),
            mappings: Vec::new(),
        }];
        for (name, t) in &self.targets {
            let postgres = match &t.url {
                Some(url) => PostgresConfig {
                    url: url.clone(),
                    password_file: t.password_file.clone(),
                    password: t.password.clone(),
                },
                None => self.postgres.clone(),
            };
            out.push(Target {
                name: name.clone(),
                postgres,
                state: StateConfig {
                    enabled: t.enabled,
                    schema: t.schema.clone(),
                    delete_mode: t.delete_mode,
                    key_columns: t.key_columns.clone(),
                    table_name: t.table_name.clone(),
                    column_types: t.column_types.clone(),
                    time_precision_mode: t.time_precision_mode,
                },
                setup_sql: t.setup_sql_resolved.clone(),
                mappings: t.mappings.clone(),
            });
        }
        out
    }

    /// A target by name, or an error listing the names there are.
    pub fn target(&self, name: &str) -> Result<Target, ConfigError> {
        let all = self.all_targets();
        let names: Vec<String> = all.iter().map(|t| t.name.clone()).collect();
        all.into_iter().find(|t| t.name == name).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "unknown target {name:?}; the config has: {}",
                names.join(", ")
            ))
        })
    }

    /// The effective config as TOML, with secrets replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        let mut c = self.clone();
        for (k, v) in c.kafka.properties.iter_mut() {
            if k.contains("password") || k.contains("secret") || k.contains("sasl.oauthbearer") {
                *v = "<redacted>".into();
            }
        }
        let mut table = toml::Table::try_from(&c).expect("config serialises");
        if let Some(pg) = table.get_mut("postgres").and_then(|v| v.as_table_mut()) {
            if self.postgres.password.is_some() {
                pg.insert("password".into(), "<redacted: from password_file>".into());
            }
        }
        toml::to_string_pretty(&table).expect("config serialises")
    }
}

fn check_pg_url(field: &str, url: &str) -> Result<(), ConfigError> {
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        return Err(ConfigError::Invalid(format!(
            "{field} must start with postgres://"
        )));
    }
    if url_password(url).is_some() {
        return Err(ConfigError::Invalid(format!(
            "{field} contains a password; use a password_file"
        )));
    }
    Ok(())
}

fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let userinfo = rest.split_once('@')?.0;
    userinfo.split_once(':').map(|(_, p)| p)
}

/// The embedded defaults: the demo stack from `tools/up` on loopback.
pub const DEMO_DEFAULTS: &str = include_str!("../../deploy/config/demo.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn demo_defaults_load_and_validate() {
        let c = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(c.state.schema, "cdc_processed");
        assert!(c.lake.enabled);
    }

    #[test]
    fn env_overrides_win_and_parse_types() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("CDC_LAKE__KAFKA__BROKERS", "10.0.0.1:9092"),
                ("CDC_LAKE__BATCH__MAX_RECORDS", "77"),
                ("CDC_LAKE__LAKE__ENABLED", "false"),
                ("CDC_LAKE__KAFKA__TOPICS", "[\"a\", \"^b\\\\..*\"]"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "10.0.0.1:9092");
        assert_eq!(c.batch.max_records, 77);
        assert!(!c.lake.enabled);
        assert_eq!(c.kafka.topics, vec!["a".to_string(), "^b\\..*".to_string()]);
    }

    #[test]
    fn invalid_configs_name_the_problem() {
        let cases = [
            (
                "CDC_LAKE__KAFKA__TOPICS",
                "[]",
                "kafka.topics lists no topic",
            ),
            (
                "CDC_LAKE__POSTGRES__URL",
                "postgres://u:hunter2@h/db",
                "contains a password",
            ),
            (
                "CDC_LAKE__POSTGRES__URL",
                "mysql://h/db",
                "must start with postgres://",
            ),
            ("CDC_LAKE__BATCH__MAX_RECORDS", "0", "max_records"),
            ("CDC_LAKE__BATCH__MAX_AGE", "5x", "needs a unit"),
            ("CDC_LAKE__BATCH__MAX_BYTES", "12XB", "unknown size unit"),
            (
                "CDC_LAKE__STATE__SCHEMA",
                "x;drop",
                "not a plain identifier",
            ),
            (
                "CDC_LAKE__KAFKA__PROPERTIES__ENABLE.AUTO.COMMIT",
                "true",
                "managed by cdc-lake",
            ),
            ("CDC_LAKE__KAFKA__NOPE", "1", "unknown field"),
            ("CDC_LAKE__KAFKA__FORMAT", "protobuf", "unknown variant"),
            (
                "CDC_LAKE__KAFKA__FORMAT",
                "avro",
                "kafka.format = \"avro\" needs kafka.schema_registry.urls",
            ),
            (
                "CDC_LAKE__KAFKA__SCHEMA_REGISTRY__URLS",
                "['https://key:secret@registry']",
                "must not hold credentials",
            ),
            (
                "CDC_LAKE__KAFKA__SCHEMA_REGISTRY__URLS",
                "['registry:8081']",
                "not an http:// or https:// URL",
            ),
            (
                "CDC_LAKE__STATE__KEY_COLUMNS",
                "{ audit_log = [] }",
                "needs a schema.table name and at least one column",
            ),
            (
                "CDC_LAKE__TARGETS__PROCESSED__SCHEMA",
                "x",
                "other than \"processed\"",
            ),
            (
                "CDC_LAKE__TARGETS__REPLICA__URL",
                "postgres://u:pw@h/db",
                "targets.replica.url contains a password",
            ),
            (
                "CDC_LAKE__POSTGRES__PASSWORD_FILE",
                "/nonexistent/pw",
                "cannot read secret file",
            ),
        ];
        for (var, value, want) in cases {
            let err = Config::load_with_env(None, env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{var}={value}: {err}");
        }
    }

    #[test]
    fn secrets_are_read_from_files_and_redacted() {
        let dir = std::env::temp_dir().join(format!("cdc-lake-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cr3t-pg\n").unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "s3cr3t-s3").unwrap();
        let c = Config::load_with_env(
            None,
            env(&[
                ("CDC_LAKE__POSTGRES__PASSWORD_FILE", pw.to_str().unwrap()),
                ("CDC_LAKE__LAKE__S3__BUCKET", "b"),
                ("CDC_LAKE__LAKE__S3__ACCESS_KEY_ID", "AKIA"),
                (
                    "CDC_LAKE__LAKE__S3__SECRET_ACCESS_KEY_FILE",
                    key.to_str().unwrap(),
                ),
                ("CDC_LAKE__KAFKA__PROPERTIES__SASL.PASSWORD", "s3cr3t-kafka"),
            ]),
        )
        .unwrap();
        assert_eq!(c.postgres.password.as_ref().unwrap().expose(), "s3cr3t-pg");
        let s3 = c.lake.s3.as_ref().unwrap();
        assert_eq!(s3.secret_access_key.as_ref().unwrap().expose(), "s3cr3t-s3");
        let shown = c.redacted();
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("<redacted"), "{shown}");
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("s3cr3t-pg") && !debug.contains("s3cr3t-s3"),
            "{debug}"
        );
    }
}
