//! The mirror tables in the catalog: their SQL types, creating them, adding and widening
//! columns, and reading back what the catalog holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;
use tokio_postgres::Transaction;

use super::{ident_for, pg_err, Dest, Mirror, StateSink};
use crate::domain::Ident;
use crate::domain::TableId;
use crate::envelope::{ChangeEvent, ColumnType, RowSchema, TimeUnit};
use crate::sink::coerce::ColumnCoercion;
use crate::sink::{Savepoint, SinkError};

/// Metadata columns every mirror carries, after the source columns.
pub(super) const META_COLUMNS: &[(&str, &str)] = &[
    ("cdc_operation", "text NOT NULL"),
    ("cdc_commit_lsn", "bigint NOT NULL"),
    ("cdc_lsn", "bigint NOT NULL"),
    ("cdc_source_ts", "timestamptz"),
    ("cdc_kafka_partition", "integer NOT NULL"),
    ("cdc_kafka_offset", "bigint NOT NULL"),
    ("cdc_synced_at", "timestamptz NOT NULL DEFAULT now()"),
    ("cdc_deleted", "boolean NOT NULL DEFAULT false"),
];

/// The primary-key columns of the table named by `$1` (a qualified name), in key order.
pub(crate) const PRIMARY_KEY_COLUMNS: &str = "SELECT a.attname::text
   FROM pg_index i
   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
  WHERE i.indrelid = to_regclass($1) AND i.indisprimary
  ORDER BY array_position(i.indkey::int2[], a.attnum)";

/// The SQL type (`format_type`) of column `$2` of the table named by `$1` (a qualified name).
pub(super) const COLUMN_TYPE: &str =
    "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
  WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped";

/// The PostgreSQL type of a mirror column. A column seen only as null so far (schemaless
/// input) has none yet: it is added, with the type of its first value, when one arrives
/// (until then its absence reads the same as NULL), rather than fixed as `text` forever.
pub fn pg_type(ty: &ColumnType) -> Option<String> {
    Some(match ty {
        ColumnType::Boolean => "boolean".into(),
        ColumnType::Int16 => "smallint".into(),
        ColumnType::Int32 => "integer".into(),
        ColumnType::Int64 => "bigint".into(),
        ColumnType::Float32 => "real".into(),
        ColumnType::Float64 => "double precision".into(),
        ColumnType::Decimal {
            precision: Some(p),
            scale,
        } if *scale >= 0 && i16::from(*scale) <= i16::from(*p) && *p <= 200 => {
            format!("numeric({p},{scale})")
        }
        ColumnType::Decimal { .. }
        | ColumnType::VariableDecimal
        | ColumnType::WideInteger
        | ColumnType::HugeInteger => "numeric".into(),
        ColumnType::Text => "text".into(),
        ColumnType::Uuid => "uuid".into(),
        ColumnType::Json => "jsonb".into(),
        ColumnType::Bytes => "bytea".into(),
        ColumnType::Date => "date".into(),
        ColumnType::Time(_) => "time".into(),
        ColumnType::Timestamp(TimeUnit::Millis | TimeUnit::Micros | TimeUnit::Nanos) => {
            "timestamp".into()
        }
        ColumnType::TimestampTz => "timestamptz".into(),
        ColumnType::TimeTz => "timetz".into(),
        ColumnType::Interval => "interval".into(),
        ColumnType::Array(elem) => format!("{}[]", pg_type(elem)?),
        ColumnType::Unknown => return None,
    })
}

impl StateSink {
    /// The SQL type of a mirror column, for reject reasons (PostgreSQL's own message would
    /// quote the value).
    pub(super) async fn column_type(
        &self,
        tx: &Transaction<'_>,
        dest: &Dest,
        column: &str,
    ) -> Option<String> {
        let mirror = self.mirrors.get(&dest.name)?;
        tx.query_opt(COLUMN_TYPE, &[&mirror.qualified, &column])
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0))
    }

    /// Creates the mirror or adds columns that appeared in these changes.
    pub(super) async fn ensure_mirror(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        events: &[&ChangeEvent],
    ) -> Result<(), SinkError> {
        let table = &dest.table;
        if let Some(mapped) = self.mapped_tables.get(table) {
            // Checked against the catalog when the target was opened; no DDL here.
            if !self.mirrors.contains_key(&dest.name) {
                self.mirrors.insert(dest.name.clone(), mapped.clone());
            }
            return Ok(());
        }
        let mut schema = RowSchema::default();
        let mut last: Option<&Arc<RowSchema>> = None;
        for e in events {
            if last.is_none_or(|l| !Arc::ptr_eq(l, &e.schema)) {
                schema.merge(&e.schema);
                last = Some(&e.schema);
            }
        }
        let qualified = self.qualified(dest)?;
        let ident = |name: &str| ident_for(table, name);
        if !self.mirrors.contains_key(&dest.name) {
            let rows = tx
                .query(
                    "SELECT a.attname::text
                       FROM pg_attribute a
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                      ORDER BY a.attnum",
                    &[&qualified],
                )
                .await
                .map_err(pg_err(self.name, format!("reading columns of {qualified}")))?;
            let existing: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            // An existing table's key is its primary key; a new one takes the changes' key.
            let primary_key: Vec<String> = tx
                .query(PRIMARY_KEY_COLUMNS, &[&qualified])
                .await
                .map_err(pg_err(
                    self.name,
                    format!("reading the primary key of {qualified}"),
                ))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let key: Vec<String> = if primary_key.is_empty() {
                events
                    .iter()
                    .find_map(|e| e.key.as_ref().and_then(Value::as_object))
                    .map(|k| k.keys().cloned().collect())
                    .unwrap_or_default()
            } else {
                primary_key
            };
            let key: Vec<Ident> = key.iter().map(|k| ident(k)).collect::<Result<_, _>>()?;
            let is_key = |c: &str| key.iter().any(|k| k == c);
            let columns = if existing.is_empty() {
                // Source columns in source order (those whose type is known yet), key columns
                // NOT NULL, then cdc-lake's metadata columns. Later columns are appended.
                let mut cols = Vec::new();
                let mut created = Vec::new();
                for k in key.iter().filter(|k| schema.column(k.name()).is_none()) {
                    cols.push(format!(
                        "{k} {} NOT NULL",
                        declared_type(&self.column_types, table, k.name()).unwrap_or("text")
                    ));
                    created.push(k.clone());
                }
                for c in &schema.columns {
                    let Some(ty) = declared_type(&self.column_types, table, &c.name)
                        .map(str::to_string)
                        .or_else(|| pg_type(&c.ty))
                        .or_else(|| is_key(&c.name).then(|| "text".into()))
                    else {
                        continue;
                    };
                    check_not_metadata(table, &c.name)?;
                    let not_null = if is_key(&c.name) { " NOT NULL" } else { "" };
                    let column = ident(&c.name)?;
                    cols.push(format!("{column} {ty}{not_null}"));
                    created.push(column);
                }
                for (m, ty) in META_COLUMNS {
                    cols.push(format!("{m} {ty}"));
                }
                let pk: Vec<&str> = key.iter().map(Ident::quoted).collect();
                tx.batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {qualified} ({}, PRIMARY KEY ({}))",
                    cols.join(", "),
                    pk.join(", ")
                ))
                .await
                .map_err(pg_err(self.name, format!("creating {qualified}")))?;
                tracing::info!(table = %qualified, key = ?pk, "created mirror table");
                created
            } else {
                // A table the user created may lack cdc-lake's metadata columns.
                let missing: Vec<String> = META_COLUMNS
                    .iter()
                    .filter(|(m, _)| !existing.iter().any(|c| c == m))
                    .map(|(m, ty)| {
                        // Rows already there get a position of 0, so any change passes the
                        // ordering guard.
                        let default = match *ty {
                            t if t.contains("DEFAULT") || !t.contains("NOT NULL") => "",
                            t if t.starts_with("text") => " DEFAULT 'r'",
                            _ => " DEFAULT 0",
                        };
                        format!("ADD COLUMN IF NOT EXISTS {m} {ty}{default}")
                    })
                    .collect();
                if !missing.is_empty() {
                    tx.batch_execute(&format!("ALTER TABLE {qualified} {}", missing.join(", ")))
                        .await
                        .map_err(pg_err(
                            self.name,
                            format!("adding cdc-lake's metadata columns to {qualified}"),
                        ))?;
                    tracing::info!(table = %qualified, columns = missing.len(), "added metadata columns to an existing table");
                }
                existing
                    .iter()
                    .filter(|c| !c.starts_with("cdc_"))
                    .map(|c| ident(c))
                    .collect::<Result<_, _>>()?
            };
            self.mirrors.insert(
                dest.name.clone(),
                Mirror {
                    qualified: qualified.clone(),
                    columns,
                    key,
                    delete_mode: self.delete_mode,
                    mapped: None,
                    applier: None,
                    numeric: Default::default(),
                    coercions: None,
                },
            );
        }
        self.widen_integer_columns(tx, dest, &schema).await?;
        let mirror = self.mirrors.get_mut(&dest.name).expect("inserted above");
        let mut added = Vec::new();
        for col in &schema.columns {
            if mirror.has_column(&col.name) {
                continue;
            }
            let Some(ty) = declared_type(&self.column_types, table, &col.name)
                .map(str::to_string)
                .or_else(|| pg_type(&col.ty))
            else {
                continue;
            };
            check_not_metadata(table, &col.name)?;
            let column = ident(&col.name)?;
            added.push(format!("ADD COLUMN IF NOT EXISTS {column} {ty}"));
            mirror.columns.push(column);
        }
        if !added.is_empty() {
            tx.batch_execute(&format!(
                "ALTER TABLE {} {}",
                mirror.qualified,
                added.join(", ")
            ))
            .await
            .map_err(pg_err(
                self.name,
                format!("adding columns to {}", mirror.qualified),
            ))?;
            mirror.applier = None;
            mirror.coercions = None;
            tracing::info!(table = %mirror.qualified, columns = added.len(), "added mirror columns");
        }
        if mirror.coercions.is_none() && mirror.mapped.is_none() {
            let rows = tx
                .query(
                    "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod)
                       FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                    &[&mirror.qualified],
                )
                .await
                .map_err(pg_err(
                    self.name,
                    format!("reading the column types of {}", mirror.qualified),
                ))?;
            let mode = self.time_precision_mode;
            mirror.coercions = Some(
                rows.iter()
                    .filter(|r| !is_metadata_column(r.get::<_, &str>(0)))
                    .filter_map(|r| {
                        let c = ColumnCoercion::of(r.get(1), r.get(2), mode)?;
                        Some((r.get::<_, String>(0), c))
                    })
                    .collect(),
            );
        }
        Ok(())
    }

    /// Integers beyond 64 bits (schemaless input) in a column that holds integers: the column
    /// becomes `numeric`, so every digit is kept. If PostgreSQL refuses (a view depends on the
    /// column, say), the column stays and values that do not fit are rejected with the reason.
    pub(super) async fn widen_integer_columns(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        schema: &RowSchema,
    ) -> Result<(), SinkError> {
        let mirror = self
            .mirrors
            .get_mut(&dest.name)
            .expect("ensured by the caller");
        let wide: Vec<Ident> = mirror
            .columns
            .iter()
            .filter(|c| {
                schema.column(c.name()).is_some_and(|s| {
                    matches!(s.ty, ColumnType::WideInteger | ColumnType::HugeInteger)
                })
            })
            .filter(|c| !mirror.numeric.contains(c.name()))
            .cloned()
            .collect();
        for column in wide {
            let ty: Option<String> = tx
                .query_opt(COLUMN_TYPE, &[&mirror.qualified, &column.name()])
                .await
                .map_err(pg_err(
                    self.name,
                    format!("reading the type of {}.{column}", mirror.qualified),
                ))?
                .map(|r| r.get(0));
            if matches!(ty.as_deref(), Some("smallint" | "integer" | "bigint")) {
                let attempt = Savepoint::begin(tx, self.name, "cdc_widen").await?;
                let altered = tx
                    .batch_execute(&format!(
                        "ALTER TABLE {} ALTER COLUMN {column} TYPE numeric",
                        mirror.qualified
                    ))
                    .await;
                match altered {
                    Ok(()) => {
                        attempt.release().await?;
                        mirror.applier = None;
                        mirror.coercions = None;
                        tracing::info!(table = %mirror.qualified, column = %column, "widened a mirror column to numeric for integers beyond 64 bits");
                    }
                    Err(e) => {
                        attempt.rollback().await?;
                        tracing::warn!(table = %mirror.qualified, column = %column, error = %crate::sink::pg_detail(&e), "cannot widen the column to numeric; integers beyond 64 bits in it are rejected");
                    }
                }
            }
            mirror.numeric.insert(column.name().to_string());
        }
        Ok(())
    }
}

/// The SQL type `column_types` declares for a column of `table`.
pub(super) fn declared_type<'a>(
    column_types: &'a BTreeMap<String, BTreeMap<String, String>>,
    table: &TableId,
    column: &str,
) -> Option<&'a str> {
    column_types
        .get(&table.to_string())?
        .get(column)
        .map(String::as_str)
}

/// Whether a source column has the name of one of a mirror's metadata columns.
pub(super) fn is_metadata_column(column: &str) -> bool {
    META_COLUMNS.iter().any(|(m, _)| *m == column)
}

/// Source columns may not use the names of cdc-lake's metadata columns (a backstop: such
/// changes are rejected one by one before the DDL).
pub(super) fn check_not_metadata(table: &TableId, column: &str) -> Result<(), SinkError> {
    if is_metadata_column(column) {
        return Err(SinkError::Encode {
            table: table.to_string(),
            reason: format!(
                "source column {column} collides with cdc-lake's metadata columns (cdc_*)"
            ),
        });
    }
    Ok(())
}
