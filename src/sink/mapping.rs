//! Declarative topic→table mappings: how a change of a source table becomes a row of an
//! analytics table (renames, transforms, constants, source metadata, a delete policy, a row
//! filter). A target with mappings applies only what they map, with the same staging COPY and
//! guarded MERGE as the mirrors (`state.rs`).
//!
//! A mapping is checked twice: offline when the config loads ([`Mapping::compile`]: syntax,
//! transforms, keys present), and against the target database's catalog when the target is
//! opened ([`Mapping::prepare`]: the table and every column exist, the key is the table's
//! primary key or a unique index, each transform can produce the column's type, constants and
//! the filter are valid SQL for the table). Either failure stops start-up with a message that
//! names the mapping and the column.

use std::sync::Arc;

use regex::Regex;
use serde_json::{Map, Value};
use tokio_postgres::Client;

use super::coerce::{decimal, epoch, epoch_days, epoch_to, numeric_scale, Kind};
use super::ident::{is_valid_ident, quote_ident};
use crate::config::{DeleteMode, EpochUnit, MappingConfig};
use crate::domain::TableId;
use crate::envelope::value::UNAVAILABLE_VALUE;
use crate::envelope::{ChangeEvent, Op, RowSchema, ValueForm};

/// The ordering guard of a mapped table: `[commit_lsn, lsn, kafka_offset]` of the change that
/// wrote the row (arrays compare element by element, like the mirrors' column triple).
pub const POSITION_COLUMN: &str = "__cdc_position";
/// Set by soft deletes.
pub const DELETED_COLUMN: &str = "__cdc_deleted";

/// Where a target column's value comes from.
#[derive(Debug, Clone, PartialEq)]
enum Input {
    /// A column of the source row.
    Column(String),
    Constant(Value),
    /// A field of Debezium's `source` block.
    Source(SourceField),
    /// The change itself: its operation, Kafka coordinates, when it was applied.
    Meta(MetaField),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceField {
    Connector,
    Name,
    Db,
    Schema,
    Table,
    TsMs,
    Snapshot,
    TxId,
    Lsn,
    Sequence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaField {
    Op,
    TsMs,
    KafkaTopic,
    KafkaPartition,
    KafkaOffset,
    SyncedAt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    /// By the target column's type: numbers become timestamps or dates for temporal columns,
    /// Debezium's base64 decimals become numbers for numeric ones; everything else as is.
    Auto,
    Epoch(EpochUnit),
    Decimal {
        scale: Option<i32>,
    },
}

#[derive(Debug, Clone)]
struct ColumnMap {
    target: String,
    input: Input,
    transform: Transform,
    /// Filled in by [`Mapping::prepare`].
    kind: Kind,
    formatted_type: String,
}

#[derive(Debug, Clone)]
enum TopicMatch {
    Exact(String),
    Pattern(Regex),
}

/// One compiled mapping.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// `targets.<name>.mappings[i] (<table>)`: how messages name this mapping.
    pub label: String,
    topic: TopicMatch,
    pub table: String,
    pub key: Vec<String>,
    pub delete: DeleteMode,
    pub filter: Option<String>,
    all_columns: bool,
    epoch_unit: EpochUnit,
    columns: Vec<ColumnMap>,
    /// Empty: mapped rows carry no Connect schema (their values are already SQL-ready).
    no_schema: Arc<RowSchema>,
}

/// A row a mapping produced from one change.
pub struct MappedRow {
    pub key: Map<String, Value>,
    pub row: Map<String, Value>,
}

impl Mapping {
    /// Parses and checks one `[[targets.<target>.mappings]]` entry without I/O.
    pub fn compile(target: &str, index: usize, cfg: &MappingConfig) -> Result<Mapping, String> {
        let label = format!("targets.{target}.mappings[{index}] ({})", cfg.table);
        let bad = |m: String| Err(format!("{label}: {m}"));
        if !is_valid_ident(&cfg.table) {
            return bad(format!(
                "table {:?} is not a plain identifier (letters, digits, _)",
                cfg.table
            ));
        }
        let topic = if cfg.topic.starts_with('^') {
            match Regex::new(&cfg.topic) {
                Ok(re) => TopicMatch::Pattern(re),
                Err(e) => return bad(format!("topic pattern {:?}: {e}", cfg.topic)),
            }
        } else if cfg.topic.trim().is_empty() {
            return bad("topic is empty".into());
        } else {
            TopicMatch::Exact(cfg.topic.clone())
        };
        if cfg.key.is_empty() {
            return bad("missing key: list the target's key columns in key = [...]".into());
        }
        if cfg.columns.is_empty() && !cfg.all_columns {
            return bad("maps no column: add [columns] or set all_columns = true".into());
        }
        let mut columns = Vec::with_capacity(cfg.columns.len());
        for (target_col, spec) in &cfg.columns {
            if !is_valid_ident(target_col) {
                return bad(format!(
                    "column {target_col:?} is not a plain identifier (letters, digits, _)"
                ));
            }
            if target_col == POSITION_COLUMN || target_col == DELETED_COLUMN {
                return bad(format!(
                    "column {target_col} is cdc-lake's own bookkeeping; map another column"
                ));
            }
            let (input, transform) =
                parse_column(spec).map_err(|m| format!("{label}: column {target_col}: {m}"))?;
            columns.push(ColumnMap {
                target: target_col.clone(),
                input,
                transform,
                kind: Kind::Other,
                formatted_type: String::new(),
            });
        }
        if !cfg.all_columns {
            if let Some(k) = cfg.key.iter().find(|k| !cfg.columns.contains_key(*k)) {
                return bad(format!(
                    "missing key: key column {k} is not mapped in [columns]"
                ));
            }
        }
        if let Some(f) = &cfg.filter {
            if f.trim().is_empty() || f.contains(';') {
                return bad(format!(
                    "filter {f:?} must be one SQL condition over the target columns"
                ));
            }
        }
        Ok(Mapping {
            label,
            topic,
            table: cfg.table.clone(),
            key: cfg.key.clone(),
            delete: cfg.delete,
            filter: cfg.filter.clone(),
            all_columns: cfg.all_columns,
            epoch_unit: cfg.epoch_unit,
            columns,
            no_schema: Arc::new(RowSchema::default()),
        })
    }

    pub fn matches(&self, topic: &str) -> bool {
        match &self.topic {
            TopicMatch::Exact(t) => t == topic,
            TopicMatch::Pattern(re) => re.is_match(topic),
        }
    }

    /// The target columns this mapping writes, in table order after [`Mapping::prepare`].
    pub fn target_columns(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.target.clone()).collect()
    }

    /// Checks the mapping against the target table in `schema` and adds the bookkeeping
    /// columns it needs. The error is the start-up message.
    pub async fn prepare(&mut self, client: &Client, schema: &str) -> Result<(), String> {
        let qualified = format!(
            "{}.{}",
            quote_ident(schema).map_err(|e| format!("{}: {e}", self.label))?,
            quote_ident(&self.table).map_err(|e| format!("{}: {e}", self.label))?
        );
        let label = self.label.clone();
        let db = |e: tokio_postgres::Error| {
            format!("{label}: reading the catalog: {}", super::pg_detail(&e))
        };
        let rows = client
            .query(
                "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod)
                   FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                  WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                &[&qualified],
            )
            .await
            .map_err(db)?;
        if rows.is_empty() {
            return Err(format!(
                "{label}: table {schema}.{} does not exist in the target database; create it in the target's setup_sql",
                self.table
            ));
        }
        let table_columns: Vec<(String, String, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let names: Vec<&str> = table_columns
            .iter()
            .map(|(n, _, _)| n.as_str())
            .filter(|n| !n.starts_with("__cdc_position") && *n != DELETED_COLUMN)
            .collect();
        for c in &self.columns {
            if !names.contains(&c.target.as_str()) {
                return Err(format!(
                    "{label}: unknown column {}: {schema}.{} has no such column (it has: {})",
                    c.target,
                    self.table,
                    names.join(", ")
                ));
            }
        }
        if self.all_columns {
            for n in &names {
                if !n.starts_with("__cdc_") && !self.columns.iter().any(|c| c.target == *n) {
                    self.columns.push(ColumnMap {
                        target: n.to_string(),
                        input: Input::Column(n.to_string()),
                        transform: Transform::Auto,
                        kind: Kind::Other,
                        formatted_type: String::new(),
                    });
                }
            }
            if let Some(k) = self
                .key
                .iter()
                .find(|k| !self.columns.iter().any(|c| &c.target == *k))
            {
                return Err(format!(
                    "{label}: missing key: key column {k} is not a column of {schema}.{}",
                    self.table
                ));
            }
        }
        // Table order, so generated SQL and error messages read like the table.
        self.columns
            .sort_by_key(|c| names.iter().position(|n| *n == c.target));
        for c in &mut self.columns {
            let (_, typname, formatted) = table_columns
                .iter()
                .find(|(n, _, _)| *n == c.target)
                .expect("checked above");
            c.kind = Kind::of(typname, formatted);
            c.formatted_type = formatted.clone();
            check_convertible(c).map_err(|m| format!("{label}: column {}: {m}", c.target))?;
        }

        let unique_keys = client
            .query(
                "SELECT array_agg(a.attname::text ORDER BY a.attname)
                   FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = to_regclass($1) AND (i.indisprimary OR i.indisunique)
                    AND i.indpred IS NULL
                  GROUP BY i.indexrelid",
                &[&qualified],
            )
            .await
            .map_err(db)?;
        let mut want = self.key.clone();
        want.sort();
        if !unique_keys
            .iter()
            .any(|r| r.get::<_, Vec<String>>(0) == want)
        {
            return Err(format!(
                "{label}: missing key: {schema}.{} has no primary key or unique index on ({}), which the set-based apply needs",
                self.table,
                self.key.join(", ")
            ));
        }

        // Constants must fit their columns; the database is the judge.
        for c in &self.columns {
            if let Input::Constant(v) = &c.input {
                let probe = serde_json::json!({ &c.target: v });
                client
                    .execute(
                        &format!("SELECT jsonb_populate_record(NULL::{qualified}, $1)"),
                        &[&postgres_types::Json(&probe)],
                    )
                    .await
                    .map_err(|e| {
                        format!(
                            "{label}: column {}: the constant {v} cannot be converted to {}: {}",
                            c.target,
                            c.formatted_type,
                            super::pg_detail(&e)
                        )
                    })?;
            }
        }
        if let Some(filter) = &self.filter {
            client
                .execute(
                    &format!("SELECT 1 FROM {qualified} WHERE ({filter}) LIMIT 0"),
                    &[],
                )
                .await
                .map_err(|e| {
                    format!(
                        "{label}: filter {filter:?} is not a valid condition over {schema}.{}: {}",
                        self.table,
                        super::pg_detail(&e)
                    )
                })?;
        }

        let mut add = vec![format!(
            "ADD COLUMN IF NOT EXISTS {POSITION_COLUMN} bigint[]"
        )];
        if self.delete == DeleteMode::Soft {
            add.push(format!(
                "ADD COLUMN IF NOT EXISTS {DELETED_COLUMN} boolean NOT NULL DEFAULT false"
            ));
        }
        client
            .batch_execute(&format!("ALTER TABLE {qualified} {}", add.join(", ")))
            .await
            .map_err(|e| {
                format!(
                    "{label}: adding cdc-lake's bookkeeping columns to {schema}.{}: {}",
                    self.table,
                    super::pg_detail(&e)
                )
            })?;
        Ok(())
    }

    /// The mapped change: same coordinates and position, the target table, the mapped key and
    /// row (SQL-ready values; TOAST placeholders kept so the apply treats them as unchanged).
    /// `None` for what this mapping does not apply (logical messages). The error is the reject
    /// reason.
    pub fn apply(
        &self,
        e: &ChangeEvent,
        schema: &str,
        synced_at: &str,
    ) -> Result<Option<ChangeEvent>, String> {
        let table = TableId {
            schema: schema.to_string(),
            table: self.table.clone(),
        };
        let mapped = |key: Option<Map<String, Value>>, row: Option<Map<String, Value>>| {
            Some(ChangeEvent {
                coords: e.coords.clone(),
                key: key.map(Value::Object),
                op: e.op,
                table: table.clone(),
                before: None,
                after: row,
                values: ValueForm::Sql,
                source: e.source.clone(),
                source_json: e.source_json.clone(),
                transaction: None,
                ts_ms: e.ts_ms,
                schema: self.no_schema.clone(),
                position: e.position,
                raw_value: e.raw_value.clone(),
                raw_key: e.raw_key.clone(),
            })
        };
        match e.op {
            Op::Message => return Ok(None),
            Op::Truncate => return Ok(mapped(None, None)),
            _ => {}
        }
        let m = self.map_row(e, synced_at)?;
        Ok(mapped(Some(m.key), Some(m.row)))
    }

    fn map_row(&self, e: &ChangeEvent, synced_at: &str) -> Result<MappedRow, String> {
        let is_delete = e.op == Op::Delete;
        // Deletes carry the key (and, under REPLICA IDENTITY FULL, the old row) in `before`.
        let mut source: Map<String, Value> = match e.row() {
            Some(image) => e.sql_image(image, true)?.into_owned(),
            None => Map::new(),
        };
        if let Some(Value::Object(k)) = &e.key {
            for (c, v) in k {
                source.entry(c.clone()).or_insert_with(|| v.clone());
            }
        }
        let mut row = Map::new();
        for c in &self.columns {
            // A delete writes only the key and the change's metadata: the data columns of
            // `before` are mostly null under the default replica identity.
            if is_delete && matches!(c.input, Input::Column(_)) && !self.key.contains(&c.target) {
                continue;
            }
            let value = match &c.input {
                Input::Column(name) => match source.get(name) {
                    Some(v) => convert(v, c, self.epoch_unit)
                        .map_err(|m| format!("{}: column {}: {m}", self.label, c.target))?,
                    None if e.after.is_some() && !is_delete => {
                        return Err(format!(
                            "{}: column {}: the change of {} has no column {name}",
                            self.label, c.target, e.table
                        ))
                    }
                    None => Value::Null,
                },
                Input::Constant(v) => v.clone(),
                Input::Source(f) => convert_meta(source_field(e, *f), c.kind),
                Input::Meta(MetaField::SyncedAt) => Value::String(synced_at.to_string()),
                Input::Meta(f) => convert_meta(meta_field(e, *f), c.kind),
            };
            row.insert(c.target.clone(), value);
        }
        let mut key = Map::new();
        for k in &self.key {
            match row.get(k) {
                Some(v) if !v.is_null() && v.as_str() != Some(UNAVAILABLE_VALUE) => {
                    key.insert(k.clone(), v.clone());
                }
                _ => {
                    return Err(format!(
                        "{}: key column {k} is null or missing in this change of {}{}",
                        self.label,
                        e.table,
                        if is_delete {
                            " (a delete carries only the source's key columns unless the table has REPLICA IDENTITY FULL)"
                        } else {
                            ""
                        }
                    ))
                }
            }
        }
        Ok(MappedRow { key, row })
    }
}

/// `"id"`, or a table with exactly one of from/value/source/meta.
fn parse_column(spec: &toml::Value) -> Result<(Input, Transform), String> {
    let t = match spec {
        toml::Value::String(s) => return Ok((Input::Column(s.clone()), Transform::Auto)),
        toml::Value::Table(t) => t,
        other => {
            return Err(format!(
                "expected a source column name or a table, not a {}",
                other.type_str()
            ))
        }
    };
    for k in t.keys() {
        if !["from", "transform", "scale", "value", "source", "meta"].contains(&k.as_str()) {
            return Err(format!(
                "unknown setting {k:?} (from, transform, scale, value, source, meta)"
            ));
        }
    }
    let given: Vec<&str> = ["from", "value", "source", "meta"]
        .into_iter()
        .filter(|k| t.contains_key(*k))
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
    let text = |k: &str| -> Result<String, String> {
        t[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{k} must be a string"))
    };
    let scale = match t.get("scale") {
        None => None,
        Some(toml::Value::Integer(s)) if (0..=1000).contains(s) => Some(*s as i32),
        Some(other) => return Err(format!("scale must be an integer 0..1000, not {other}")),
    };
    let transform = match t.get("transform").map(|v| v.as_str()) {
        None => Transform::Auto,
        Some(Some("epoch_ms")) => Transform::Epoch(EpochUnit::Ms),
        Some(Some("epoch_us")) => Transform::Epoch(EpochUnit::Us),
        Some(Some("decimal")) => Transform::Decimal { scale },
        Some(Some(other)) => {
            return Err(format!(
                "unknown transform {other:?} (epoch_ms, epoch_us, decimal)"
            ))
        }
        Some(None) => return Err("transform must be a string".into()),
    };
    if scale.is_some() && !matches!(transform, Transform::Decimal { .. }) {
        return Err("scale applies only to transform = \"decimal\"".into());
    }
    if transform != Transform::Auto && !t.contains_key("from") {
        return Err("a transform applies to a source column (from = ...)".into());
    }
    let input = match given[0] {
        "from" => Input::Column(text("from")?),
        "value" => Input::Constant(
            serde_json::to_value(&t["value"]).map_err(|e| format!("value: {e}"))?,
        ),
        "source" => Input::Source(match text("source")?.as_str() {
            "connector" => SourceField::Connector,
            "name" => SourceField::Name,
            "db" => SourceField::Db,
            "schema" => SourceField::Schema,
            "table" => SourceField::Table,
            "ts_ms" => SourceField::TsMs,
            "snapshot" => SourceField::Snapshot,
            "txId" | "tx_id" => SourceField::TxId,
            "lsn" => SourceField::Lsn,
            "sequence" => SourceField::Sequence,
            other => {
                return Err(format!(
                    "unknown source field {other:?} (connector, name, db, schema, table, ts_ms, snapshot, txId, lsn, sequence)"
                ))
            }
        }),
        _ => Input::Meta(match text("meta")?.as_str() {
            "op" => MetaField::Op,
            "ts_ms" => MetaField::TsMs,
            "kafka_topic" => MetaField::KafkaTopic,
            "kafka_partition" => MetaField::KafkaPartition,
            "kafka_offset" => MetaField::KafkaOffset,
            "synced_at" => MetaField::SyncedAt,
            other => {
                return Err(format!(
                    "unknown meta field {other:?} (op, ts_ms, kafka_topic, kafka_partition, kafka_offset, synced_at)"
                ))
            }
        }),
    };
    Ok((input, transform))
}

/// Whether what a column's input produces can be stored in its type.
fn check_convertible(c: &ColumnMap) -> Result<(), String> {
    // What the input produces, and whether the column's type can hold it: one arm per shape.
    let (produces, fits) = match (&c.input, c.transform) {
        (_, Transform::Epoch(_)) => ("a timestamp", c.kind.temporal()),
        (_, Transform::Decimal { .. }) => ("a number", c.kind.numeric() || c.kind == Kind::Text),
        // The type of a source column or constant is known only when a value arrives.
        (Input::Column(_) | Input::Constant(_), Transform::Auto) => return Ok(()),
        (Input::Source(SourceField::TsMs) | Input::Meta(MetaField::TsMs), _) => (
            "a timestamp (epoch milliseconds)",
            c.kind.temporal() || c.kind.numeric(),
        ),
        (Input::Meta(MetaField::SyncedAt), _) => (
            "a timestamp",
            matches!(c.kind, Kind::TimestampTz | Kind::Timestamp),
        ),
        (
            Input::Source(SourceField::Lsn | SourceField::TxId)
            | Input::Meta(MetaField::KafkaPartition | MetaField::KafkaOffset),
            _,
        ) => (
            "an integer",
            matches!(c.kind, Kind::Integer | Kind::Numeric { .. } | Kind::Text),
        ),
        (Input::Source(_) | Input::Meta(_), _) => ("text", c.kind == Kind::Text),
    };
    if fits {
        return Ok(());
    }
    Err(format!(
        "cannot convert: it produces {produces}, which a column of type {} cannot hold",
        c.formatted_type
    ))
}

fn source_field(e: &ChangeEvent, f: SourceField) -> Value {
    let s = &e.source;
    let text = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    match f {
        SourceField::Connector => text(&s.connector),
        SourceField::Name => text(&s.name),
        SourceField::Db => text(&s.db),
        SourceField::Schema => Value::String(e.table.schema.clone()),
        SourceField::Table => Value::String(e.table.table.clone()),
        SourceField::TsMs => s.ts_ms.map_or(Value::Null, Value::from),
        SourceField::Snapshot => text(&s.snapshot),
        SourceField::TxId => s.tx_id.map_or(Value::Null, Value::from),
        SourceField::Lsn => s.lsn.map_or(Value::Null, Value::from),
        SourceField::Sequence => text(&s.sequence),
    }
}

fn meta_field(e: &ChangeEvent, f: MetaField) -> Value {
    match f {
        MetaField::Op => Value::String(e.op.code().to_string()),
        MetaField::TsMs => e.ts_ms.map_or(Value::Null, Value::from),
        MetaField::KafkaTopic => Value::String(e.coords.topic.clone()),
        MetaField::KafkaPartition => Value::from(e.coords.partition),
        MetaField::KafkaOffset => Value::from(e.coords.offset),
        MetaField::SyncedAt => unreachable!("filled in by the caller"),
    }
}

/// Metadata values are typed already; epoch milliseconds become timestamps for temporal columns.
fn convert_meta(v: Value, kind: Kind) -> Value {
    if kind.temporal() {
        if let Some(ms) = v.as_i64() {
            return epoch_to(ms.saturating_mul(1000), kind).unwrap_or(v);
        }
    }
    v
}

/// Converts one source value for its target column.
fn convert(v: &Value, c: &ColumnMap, unit: EpochUnit) -> Result<Value, String> {
    if v.is_null() || v.as_str() == Some(UNAVAILABLE_VALUE) {
        return Ok(v.clone());
    }
    match c.transform {
        Transform::Epoch(unit) => epoch(v, unit, c.kind),
        Transform::Decimal { scale } => decimal(v, scale.or(numeric_scale(c.kind))),
        Transform::Auto => match c.kind {
            // Debezium's Date: days since the epoch.
            Kind::Date if v.is_i64() => epoch_days(v.as_i64().expect("checked")),
            Kind::TimestampTz | Kind::Timestamp | Kind::Time if v.is_number() => {
                epoch(v, unit, c.kind)
            }
            Kind::Numeric { scale } if !v.is_number() => decimal(v, scale),
            _ => Ok(v.clone()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> MappingConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn column(kind: Kind, transform: Transform) -> ColumnMap {
        ColumnMap {
            target: "c".into(),
            input: Input::Column("c".into()),
            transform,
            kind,
            formatted_type: String::new(),
        }
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
                   columns = { a = { from = "a", transform = "epoch_days" } }"#,
                "column a: unknown transform \"epoch_days\"",
            ),
            (
                r#"topic = "t"
                   table = "f"
                   key = ["a"]
                   columns = { a = { from = "a", value = 1 } }"#,
                "needs exactly one of from, value, source, meta (has from, value)",
            ),
            (
                r#"topic = "t"
                   table = "f"
                   key = ["a"]
                   columns = { a = { source = "xid" } }"#,
                "unknown source field \"xid\"",
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
            let err = Mapping::compile("x", 0, &cfg(text)).unwrap_err();
            assert!(err.starts_with("targets.x.mappings[0] (f): "), "{err}");
            assert!(err.contains(want), "want {want:?} in {err}");
        }
    }

    #[test]
    fn epochs_become_the_column_type() {
        let ms = Value::from(1_709_375_445_123i64);
        let tz = column(Kind::TimestampTz, Transform::Epoch(EpochUnit::Ms));
        assert_eq!(
            convert(&ms, &tz, EpochUnit::Ms).unwrap(),
            "2024-03-02T10:30:45.123000Z"
        );
        let naive = column(Kind::Timestamp, Transform::Auto);
        assert_eq!(
            convert(&ms, &naive, EpochUnit::Ms).unwrap(),
            "2024-03-02T10:30:45.123000"
        );
        let us = column(Kind::TimestampTz, Transform::Auto);
        assert_eq!(
            convert(&Value::from(1_709_375_445_123_456i64), &us, EpochUnit::Us).unwrap(),
            "2024-03-02T10:30:45.123456Z"
        );
        let date = column(Kind::Date, Transform::Auto);
        assert_eq!(
            convert(&Value::from(19_784), &date, EpochUnit::Ms).unwrap(),
            "2024-03-02"
        );
        // Already a timestamp (a ZonedTimestamp string): unchanged.
        let s = Value::String("2024-03-02T10:30:45.123456Z".into());
        assert_eq!(convert(&s, &tz, EpochUnit::Ms).unwrap(), s);
        assert!(convert(&Value::Bool(true), &tz, EpochUnit::Ms)
            .unwrap_err()
            .contains("expected an epoch number"));
    }

    #[test]
    fn debezium_decimals_become_numbers() {
        // 12345 unscaled = 0x3039, base64 "MDk=".
        let b64 = Value::String("MDk=".into());
        let by_type = column(Kind::Numeric { scale: Some(2) }, Transform::Auto);
        assert_eq!(convert(&b64, &by_type, EpochUnit::Ms).unwrap(), "123.45");
        let explicit = column(Kind::Float, Transform::Decimal { scale: Some(3) });
        assert_eq!(convert(&b64, &explicit, EpochUnit::Ms).unwrap(), "12.345");
        let variable = serde_json::json!({"scale": 1, "value": "MDk="});
        assert_eq!(
            convert(&variable, &explicit, EpochUnit::Ms).unwrap(),
            "1234.5"
        );
        let double = Value::from(25.98);
        assert_eq!(convert(&double, &by_type, EpochUnit::Ms).unwrap(), double);
        let no_scale = column(Kind::Numeric { scale: None }, Transform::Auto);
        assert!(convert(&b64, &no_scale, EpochUnit::Ms)
            .unwrap_err()
            .contains("give its scale"));
        assert_eq!(
            Kind::of("numeric", "numeric(10,2)"),
            Kind::Numeric { scale: Some(2) }
        );
    }

    #[test]
    fn transforms_that_cannot_fill_the_column_are_refused() {
        let mut c = column(Kind::Integer, Transform::Epoch(EpochUnit::Ms));
        c.formatted_type = "integer".into();
        assert_eq!(
            check_convertible(&c).unwrap_err(),
            "cannot convert: it produces a timestamp, which a column of type integer cannot hold"
        );
        c.input = Input::Source(SourceField::Db);
        c.transform = Transform::Auto;
        assert!(check_convertible(&c).is_err());
        c.input = Input::Source(SourceField::Lsn);
        assert!(check_convertible(&c).is_ok());
    }
}
