//! A mapping checked against the target database's catalog when the target is opened.

use tokio_postgres::Client;

use super::{ColumnMap, Mapping, DELETED_COLUMN, POSITION_COLUMN};
use crate::config::{DeleteMode, Input, MetaField, SourceField, Transform};
use crate::sink::coerce::Kind;
use crate::sink::ident::quote_ident;

impl Mapping {
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
            format!(
                "{label}: reading the catalog: {}",
                crate::sink::pg_detail(&e)
            )
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
                            crate::sink::pg_detail(&e)
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
                        crate::sink::pg_detail(&e)
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
                    crate::sink::pg_detail(&e)
                )
            })?;
        Ok(())
    }
}

/// Whether what a column's input produces can be stored in its type.
pub(super) fn check_convertible(c: &ColumnMap) -> Result<(), String> {
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
