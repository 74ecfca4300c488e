//! `routes.yaml`: the filter definitions, loaded and checked with the file, line and filter id
//! of every mistake.
//!
//! ```yaml
//! filters:
//!   - id: cancelled-orders
//!     consumer: finance
//!     tables: [public.orders]          # or topics: [...]; a name, or ^regex
//!     ops: [c, u]                      # default: all of c u d r t
//!     when:
//!       and:
//!         - { field: after.status, equals: cancelled }
//!         - { field: after.total_amount, greaterThan: 100.00 }
//!     topic: filtered-cancellations
//!     output: envelope                 # or after
//!     format: json                     # or avro (needs Avro input and a registry)
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde_yaml::Value as Yaml;

use super::condition::{self, Condition, ConditionError, Field};
use super::operand;
use crate::envelope::{ChangeEvent, RowSchema};

/// What a routed record's value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputShape {
    /// The Debezium envelope as received (its `payload` when it came as `{schema, payload}`),
    /// with `filterMetadata` added.
    Envelope,
    /// The row image only, in the shape of Debezium's `ExtractNewRecordState` with
    /// `delete.handling.mode=rewrite`: `after` (the `before` image for a delete), plus `__op`,
    /// `__deleted` and `filterMetadata`.
    After,
}

/// How a routed record's value is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// JSON text.
    #[default]
    Json,
    /// Confluent-framed Avro, its schema registered under `<topic>-value`. Built from the
    /// source record's own Avro bytes and writer schema, so it needs Avro input.
    Avro,
}

/// A table or topic name, or a `^regex` over it.
#[derive(Debug, Clone)]
pub enum NamePattern {
    Exact(String),
    Regex(Regex),
}

impl NamePattern {
    fn parse(s: &str) -> Result<NamePattern, String> {
        if s.starts_with('^') {
            Regex::new(s)
                .map(NamePattern::Regex)
                .map_err(|e| format!("bad regular expression {s:?}: {e}"))
        } else {
            Ok(NamePattern::Exact(s.to_string()))
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(n) => n == name,
            NamePattern::Regex(r) => r.is_match(name),
        }
    }
}

/// One filter: which changes it takes and where they go.
#[derive(Debug, Clone)]
pub struct Filter {
    pub id: String,
    pub consumer: String,
    /// Source tables (`schema.table`, or `table` alone); empty: any.
    pub tables: Vec<NamePattern>,
    /// Source topics; empty: any.
    pub topics: Vec<NamePattern>,
    /// Operation codes it takes.
    pub ops: Vec<String>,
    pub when: Option<Condition>,
    pub topic: String,
    pub output: OutputShape,
    pub format: OutputFormat,
    /// The line of its `id` in the file.
    pub line: usize,
}

impl Filter {
    /// Whether the change comes from a table and topic this filter covers, with an op it takes.
    pub fn selects(&self, e: &ChangeEvent) -> bool {
        self.selects_table(e) && self.ops.iter().any(|o| o == e.op.code())
    }

    /// Whether the change comes from a table and topic this filter covers.
    pub fn selects_table(&self, e: &ChangeEvent) -> bool {
        let qualified = e.table.to_string();
        (self.tables.is_empty()
            || self
                .tables
                .iter()
                .any(|p| p.matches(&qualified) || p.matches(&e.table.table)))
            && self.may_read_topic(&e.coords.topic)
    }

    /// Whether the filter can take changes of this topic (tables are known per change only).
    pub fn may_read_topic(&self, topic: &str) -> bool {
        self.topics.is_empty() || self.topics.iter().any(|p| p.matches(topic))
    }

    /// Checks the condition's columns and literals against a table's known schema: a column
    /// the table lacks, or a literal its type cannot be compared with.
    pub fn check_schema(&self, table: &str, schema: &RowSchema) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(when) = &self.when else {
            return problems;
        };
        for (field, test) in when.tests() {
            let (Field::After(c) | Field::Before(c)) = field else {
                continue;
            };
            let Some(column) = schema.column(c) else {
                problems.push(format!("{field}: table {table} has no column {c:?}"));
                continue;
            };
            for literal in test.literals() {
                if let Err(operand::TypeMismatch(m)) = operand::comparable(&column.ty, literal) {
                    problems.push(format!("{field} ({:?}): {m}", column.ty));
                }
            }
        }
        problems
    }
}

/// The loaded file.
#[derive(Debug, Clone)]
pub struct Routes {
    pub path: PathBuf,
    pub filters: Vec<Filter>,
}

/// A mistake in the file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {}{message}", filter.as_ref().map(|f| format!("filter {f:?}: ")).unwrap_or_default())]
pub struct RouteError {
    pub file: String,
    pub line: usize,
    pub filter: Option<String>,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml {
    filters: Vec<FilterYaml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterYaml {
    id: String,
    consumer: String,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    ops: Option<Vec<String>>,
    #[serde(default)]
    when: Option<Yaml>,
    topic: String,
    #[serde(default = "default_shape")]
    output: OutputShape,
    #[serde(default)]
    format: OutputFormat,
}

fn default_shape() -> OutputShape {
    OutputShape::Envelope
}

/// A Kafka topic name: 1–249 of `[A-Za-z0-9._-]`, not `.` or `..`.
fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Routes {
    /// Loads and checks `path`. Every mistake is reported, not only the first.
    pub fn load(path: &Path) -> Result<Routes, Vec<RouteError>> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![RouteError {
                file: file.clone(),
                line: 0,
                filter: None,
                message: format!("cannot read: {e}"),
            }]
        })?;
        Routes::parse(&file, &text)
    }

    /// Parses and checks the text of a routes file named `file`.
    pub fn parse(file: &str, text: &str) -> Result<Routes, Vec<RouteError>> {
        let raw: FileYaml = serde_yaml::from_str(text).map_err(|e| {
            vec![RouteError {
                file: file.to_string(),
                line: e.location().map_or(0, |l| l.line()),
                filter: None,
                message: e.to_string(),
            }]
        })?;
        let lines = Lines::new(text);
        let mut errors = Vec::new();
        let mut filters = Vec::new();
        let mut seen = HashSet::new();
        let mut from = 0;
        for f in raw.filters {
            let line = lines
                .find(&format!("id: {}", f.id), from)
                .or_else(|| lines.find(&f.id, from));
            let line = line.unwrap_or(from);
            from = line;
            let mut problem = |token: &str, message: String| {
                errors.push(RouteError {
                    file: file.to_string(),
                    line: lines
                        .find(token, line)
                        .filter(|_| !token.is_empty())
                        .unwrap_or(line)
                        .max(1),
                    filter: Some(f.id.clone()),
                    message,
                })
            };
            if !seen.insert(f.id.clone()) {
                problem("", "the id is used by an earlier filter".into());
            }
            if f.id.is_empty() || f.consumer.is_empty() {
                problem("", "`id` and `consumer` must not be empty".into());
            }
            if !valid_topic(&f.topic) {
                problem(
                    "topic:",
                    format!("{:?} is not a valid Kafka topic name", f.topic),
                );
            }
            let mut patterns = |names: &[String], what: &str| -> Vec<NamePattern> {
                names
                    .iter()
                    .filter_map(|n| match NamePattern::parse(n) {
                        Ok(p) => Some(p),
                        Err(m) => {
                            problem(n, format!("{what}: {m}"));
                            None
                        }
                    })
                    .collect()
            };
            let tables = patterns(&f.tables, "tables");
            let topics = patterns(&f.topics, "topics");
            let ops = f
                .ops
                .unwrap_or_else(|| ["c", "u", "d", "r", "t"].map(String::from).to_vec());
            for op in &ops {
                if !condition::is_op_code(op) {
                    problem(
                        "ops:",
                        format!("unknown operation {op:?}: the codes are c, u, d, r, t"),
                    );
                }
            }
            let when = match f.when.as_ref().map(|w| Condition::parse(w, "when")) {
                None => None,
                Some(Ok(c)) => Some(c),
                Some(Err(ConditionError {
                    path,
                    token,
                    message,
                })) => {
                    problem(&token, format!("{path}: {message}"));
                    None
                }
            };
            filters.push(Filter {
                id: f.id,
                consumer: f.consumer,
                tables,
                topics,
                ops,
                when,
                topic: f.topic,
                output: f.output,
                format: f.format,
                line,
            });
        }
        if errors.is_empty() {
            Ok(Routes {
                path: PathBuf::from(file),
                filters,
            })
        } else {
            Err(errors)
        }
    }

    /// Checks the `format: avro` filters against the deployment: Avro output is built from
    /// the source's Avro records (`kafka.format` avro or auto) and registered with
    /// `kafka.schema_registry`.
    pub fn check_avro_output(
        &self,
        reads_avro: bool,
        has_registry: bool,
    ) -> Result<(), Vec<RouteError>> {
        let problem = match (reads_avro, has_registry) {
            (true, true) => return Ok(()),
            (false, _) => {
                "format avro is built from the source's Avro records, but kafka.format is json"
            }
            (true, false) => {
                "format avro registers its schema, but kafka.schema_registry is not set"
            }
        };
        let errors: Vec<RouteError> = self
            .filters
            .iter()
            .filter(|f| f.format == OutputFormat::Avro)
            .map(|f| RouteError {
                file: self.path.display().to_string(),
                line: f.line,
                filter: Some(f.id.clone()),
                message: problem.into(),
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, id: &str) -> Option<&Filter> {
        self.filters.iter().find(|f| f.id == id)
    }
}

/// Line lookup for messages: serde_yaml keeps no positions once parsed, so a filter is found
/// by its `id` line and a mistake inside it by the first line at or after it with the token.
struct Lines<'a>(Vec<&'a str>);

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        Self(text.lines().collect())
    }

    /// The 1-based line at or after `from` that holds `token`.
    fn find(&self, token: &str, from: usize) -> Option<usize> {
        self.0
            .iter()
            .enumerate()
            .skip(from.saturating_sub(1))
            .find(|(_, l)| {
                let code = l.split(" #").next().unwrap_or(l);
                code.contains(token)
            })
            .map(|(i, _)| i + 1)
    }
}
