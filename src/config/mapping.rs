//! `[[targets.<name>.mappings]]`: declarative topic→table mappings as configured, typed by serde
//! and checked without I/O when the config loads ([`MappingConfig::check`]). The sink compiles
//! a checked mapping and checks it against the target's catalog (`sink::mapping`).

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize};

use super::{default_delete_mode, DeleteMode};
use crate::domain::is_plain_ident;

/// The ordering guard of a mapped table: `[commit_lsn, lsn, kafka_offset]` of the change that
/// wrote the row (arrays compare element by element, like the mirrors' column triple).
pub const POSITION_COLUMN: &str = "__cdc_position";
/// Set by soft deletes.
pub const DELETED_COLUMN: &str = "__cdc_deleted";

/// One declarative topic→table mapping (see docs/analytics.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// The source topic, or a regex over topic names when it starts with `^`.
    pub topic: String,
    /// The target table, in the target's schema. It must exist (create it in `setup_sql`).
    pub table: String,
    /// Target key columns: the table's primary key or a unique index, each mapped below.
    pub key: Vec<String>,
    /// What a source delete does: remove the row, mark it (`__cdc_deleted`), or keep it.
    #[serde(default = "default_delete_mode")]
    pub delete: DeleteMode,
    /// An SQL condition over the target columns. A row for which it is not true is kept out of
    /// the table (and removed from it, by the delete policy, when an update stops matching).
    #[serde(default)]
    pub filter: Option<String>,
    /// Also copy every other column of the target table from the source column of that name.
    #[serde(default)]
    pub all_columns: bool,
    /// How numbers arriving for timestamp, date-less time and timestamptz columns read:
    /// `ms` (the seeds' time.precision.mode=connect) or `us` (Debezium's adaptive default).
    #[serde(default)]
    pub epoch_unit: EpochUnit,
    /// Target column = a source column name, or a table: `{ from = "col", transform =
    /// "epoch_ms" | "epoch_us" | "decimal", scale = N }`, `{ value = <constant> }`,
    /// `{ source = "lsn" | "ts_ms" | "db" | ... }` or `{ meta = "op" | "synced_at" | ... }`.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnSpec>,
}

/// Unit of epoch numbers in temporal columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EpochUnit {
    #[default]
    Ms,
    Us,
}

/// One `[columns]` entry as written: a source column's name, or a table of settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ColumnSpec {
    Column(String),
    Table(ColumnTable),
}

/// The table form of a column entry. Exactly one of `from`, `value`, `source`, `meta` is set;
/// [`ColumnSpec::input`] checks the combination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnTable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<TransformName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<toml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<MetaField>,
}

/// A string is a source column; a table is read as a [`ColumnTable`], so a wrong setting's
/// message names the setting (serde's untagged enums would only say that nothing matched).
impl<'de> Deserialize<'de> for ColumnSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(ColumnSpec::Column(s)),
            table @ toml::Value::Table(_) => table
                .try_into::<ColumnTable>()
                .map(ColumnSpec::Table)
                .map_err(|e| D::Error::custom(e.message())),
            other => Err(D::Error::custom(format!(
                "expected a source column name or a table, not a {}",
                other.type_str()
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformName {
    EpochMs,
    EpochUs,
    Decimal,
}

/// A field of Debezium's `source` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceField {
    Connector,
    Name,
    Db,
    Schema,
    Table,
    TsMs,
    Snapshot,
    #[serde(rename = "txId", alias = "tx_id")]
    TxId,
    Lsn,
    Sequence,
}

/// The change itself: its operation, Kafka coordinates, when it was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetaField {
    Op,
    TsMs,
    KafkaTopic,
    KafkaPartition,
    KafkaOffset,
    SyncedAt,
}

/// Where a target column's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A column of the source row.
    Column(String),
    Constant(serde_json::Value),
    Source(SourceField),
    Meta(MetaField),
}

/// How a source value becomes the column's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// By the target column's type: numbers become timestamps or dates for temporal columns,
    /// Debezium's base64 decimals become numbers for numeric ones; everything else as is.
    Auto,
    Epoch(EpochUnit),
    Decimal {
        scale: Option<i32>,
    },
}

impl ColumnSpec {
    /// The column's input and transform, or why the combination of settings is wrong.
    pub fn input(&self) -> Result<(Input, Transform), String> {
        let t = match self {
            ColumnSpec::Column(s) => return Ok((Input::Column(s.clone()), Transform::Auto)),
            ColumnSpec::Table(t) => t,
        };
        let given: Vec<&str> = [
            ("from", t.from.is_some()),
            ("value", t.value.is_some()),
            ("source", t.source.is_some()),
            ("meta", t.meta.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if given.len() != 1 {
            return Err(format!(
                "needs exactly one of from, value, source, meta (has {})",
                if given.is_empty() {
                    "none".to_string()
                } else {
                    given.join(", ")
                }
            ));
        }
        let scale = match t.scale {
            Some(s) if s > 1000 => return Err(format!("scale must be 0..1000, not {s}")),
            s => s.map(i32::from),
        };
        let transform = match t.transform {
            None => Transform::Auto,
            Some(TransformName::EpochMs) => Transform::Epoch(EpochUnit::Ms),
            Some(TransformName::EpochUs) => Transform::Epoch(EpochUnit::Us),
            Some(TransformName::Decimal) => Transform::Decimal { scale },
        };
        if scale.is_some() && !matches!(transform, Transform::Decimal { .. }) {
            return Err("scale applies only to transform = \"decimal\"".into());
        }
        if transform != Transform::Auto && t.from.is_none() {
            return Err("a transform applies to a source column (from = ...)".into());
        }
        let input = if let Some(from) = &t.from {
            Input::Column(from.clone())
        } else if let Some(value) = &t.value {
            Input::Constant(serde_json::to_value(value).map_err(|e| format!("value: {e}"))?)
        } else if let Some(source) = t.source {
            Input::Source(source)
        } else {
            Input::Meta(t.meta.expect("exactly one is set, checked above"))
        };
        Ok((input, transform))
    }
}

/// Which topics a mapping reads.
#[derive(Debug, Clone)]
pub enum TopicMatch {
    Exact(String),
    Pattern(Regex),
}

impl TopicMatch {
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicMatch::Exact(t) => t == topic,
            TopicMatch::Pattern(re) => re.is_match(topic),
        }
    }
}

/// A mapping that passed the offline checks: its label for messages, its topics, and each
/// target column's input.
#[derive(Debug, Clone)]
pub struct CheckedMapping {
    /// `targets.<name>.mappings[i] (<table>)`: how messages name this mapping.
    pub label: String,
    pub topic: TopicMatch,
    pub columns: Vec<(String, Input, Transform)>,
}

impl MappingConfig {
    /// Checks the mapping without I/O: names, topic pattern, key, columns and filter. The error
    /// names the mapping (`targets.<target>.mappings[<index>] (<table>)`) and the column.
    pub fn check(&self, target: &str, index: usize) -> Result<CheckedMapping, String> {
        let label = format!("targets.{target}.mappings[{index}] ({})", self.table);
        let bad = |m: String| Err(format!("{label}: {m}"));
        if !is_plain_ident(&self.table) {
            return bad(format!(
                "table {:?} is not a plain identifier (letters, digits, _)",
                self.table
            ));
        }
        let topic = if self.topic.starts_with('^') {
            match Regex::new(&self.topic) {
                Ok(re) => TopicMatch::Pattern(re),
                Err(e) => return bad(format!("topic pattern {:?}: {e}", self.topic)),
            }
        } else if self.topic.trim().is_empty() {
            return bad("topic is empty".into());
        } else {
            TopicMatch::Exact(self.topic.clone())
        };
        if self.key.is_empty() {
            return bad("missing key: list the target's key columns in key = [...]".into());
        }
        if self.columns.is_empty() && !self.all_columns {
            return bad("maps no column: add [columns] or set all_columns = true".into());
        }
        let mut columns = Vec::with_capacity(self.columns.len());
        for (target_col, spec) in &self.columns {
            if !is_plain_ident(target_col) {
                return bad(format!(
                    "column {target_col:?} is not a plain identifier (letters, digits, _)"
                ));
            }
            if target_col == POSITION_COLUMN || target_col == DELETED_COLUMN {
                return bad(format!(
                    "column {target_col} is cdc-lake's own bookkeeping; map another column"
                ));
            }
            let (input, transform) = spec
                .input()
                .map_err(|m| format!("{label}: column {target_col}: {m}"))?;
            columns.push((target_col.clone(), input, transform));
        }
        if !self.all_columns {
            if let Some(k) = self.key.iter().find(|k| !self.columns.contains_key(*k)) {
                return bad(format!(
                    "missing key: key column {k} is not mapped in [columns]"
                ));
            }
        }
        if let Some(f) = &self.filter {
            if f.trim().is_empty() || f.contains(';') {
                return bad(format!(
                    "filter {f:?} must be one SQL condition over the target columns"
                ));
            }
        }
        Ok(CheckedMapping {
            label,
            topic,
            columns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<MappingConfig, String> {
        toml::from_str(toml_text).map_err(|e| e.to_string())
    }

    #[test]
    fn invalid_mappings_name_the_problem() {
        let cases = [
            (
                r#"topic = "t"
                   table = "f"
                   key = []
                   columns = { a = "a" }"#,
                "missing key: list the target's key columns",
            ),
            (
                r#"topic = "t"
                   table = "f"
                   key = ["id"]
                   columns = { a = "a" }"#,
                "missing key: key column id is not mapped",
            ),
            (
                r#"topic = "t"
                   table = "f"
                   key = ["a"]
                   columns = { a = { from = "a", value = 1 } }"#,
                "column a: needs exactly one of from, value, source, meta (has from, value)",
            ),
            (
                r#"topic = "t"
                   table = "f"
                   key = ["a"]
                   columns = { a = { value = 1, transform = "decimal" } }"#,
                "column a: a transform applies to a source column",
            ),
            (
                r#"topic = "t"
                   table = "f"
                   key = ["a"]
                   columns = { a = { from = "a", scale = 2 } }"#,
                "column a: scale applies only to transform = \"decimal\"",
            ),
            (
                r#"topic = "^(unclosed"
                   table = "f"
                   key = ["a"]
                   columns = { a = "a" }"#,
                "topic pattern",
            ),
            (
                r#"topic = "t"
                   table = "f"
                   key = ["a"]
                   filter = "true; DROP TABLE f"
                   columns = { a = "a" }"#,
                "must be one SQL condition",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap().check("x", 0).unwrap_err();
            assert!(err.starts_with("targets.x.mappings[0] (f): "), "{err}");
            assert!(err.contains(want), "want {want:?} in {err}");
        }
    }

    #[test]
    fn unknown_settings_are_named_when_the_config_parses() {
        let cases = [
            (
                "{ from = \"a\", transform = \"epoch_days\" }",
                "unknown variant `epoch_days`",
            ),
            ("{ source = \"xid\" }", "unknown variant `xid`"),
            ("{ form = \"a\" }", "unknown field `form`"),
            (
                "1",
                "expected a source column name or a table, not a integer",
            ),
        ];
        for (spec, want) in cases {
            let text =
                format!("topic = \"t\"\ntable = \"f\"\nkey = [\"a\"]\ncolumns = {{ a = {spec} }}");
            let err = parse(&text).unwrap_err();
            assert!(err.contains(want), "want {want:?} in {err}");
        }
    }

    #[test]
    fn column_specs_read_as_their_input() {
        let m = parse(
            r#"topic = "t"
               table = "f"
               key = ["id"]
               columns = { id = "id", at = { from = "ts", transform = "epoch_us" }, lsn = { source = "lsn" }, tx = { source = "tx_id" }, op = { meta = "op" }, k = { value = "x" }, amount = { from = "a", transform = "decimal", scale = 2 } }"#,
        )
        .unwrap();
        let checked = m.check("x", 0).unwrap();
        let input = |name: &str| {
            checked
                .columns
                .iter()
                .find(|(c, _, _)| c == name)
                .map(|(_, i, t)| (i.clone(), *t))
                .unwrap()
        };
        assert_eq!(input("id"), (Input::Column("id".into()), Transform::Auto));
        assert_eq!(
            input("at"),
            (Input::Column("ts".into()), Transform::Epoch(EpochUnit::Us))
        );
        assert_eq!(input("lsn").0, Input::Source(SourceField::Lsn));
        assert_eq!(input("tx").0, Input::Source(SourceField::TxId));
        assert_eq!(input("op").0, Input::Meta(MetaField::Op));
        assert_eq!(input("k").0, Input::Constant(serde_json::json!("x")));
        assert_eq!(input("amount").1, Transform::Decimal { scale: Some(2) });
    }
}
