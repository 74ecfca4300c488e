//! The typed staging table of a mirror or mapped table: one column per table column, with the
//! table column's own type, so COPY hands each value to its type's input function once and the
//! MERGE reads plain columns (no jsonb document per change, no `jsonb_populate_record`).
//!
//! Arrays and composite columns are the exception: they are staged as jsonb and converted in
//! the MERGE by `jsonb_populate_record`, which turns JSON arrays and objects into them.

use std::hash::{Hash, Hasher};

use tokio_postgres::Transaction;

use super::copy_text::ValueText;
use super::{pg_err, Mirror};
use crate::domain::Ident;
use crate::sink::mapping::{DELETED_COLUMN, POSITION_COLUMN};
use crate::sink::SinkError;

/// One column of the staged table, in staging order. Staged as `c<position>` (1-based), so no
/// source column name can collide with the staging table's own `_cdc_*` columns.
#[derive(Debug, Clone)]
pub(super) struct StageColumn {
    pub name: Ident,
    /// The target column's type (`format_type`).
    pub sql_type: String,
    pub kind: ColumnKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ColumnKind {
    /// Staged with the column's own type from its text.
    Scalar,
    /// json or jsonb: staged with the column's type from the value's JSON text.
    Json,
    /// Arrays and composites: staged as jsonb, converted in the MERGE.
    ViaJsonb,
}

impl ColumnKind {
    pub(super) fn text(self) -> ValueText {
        match self {
            ColumnKind::Scalar => ValueText::Plain,
            ColumnKind::Json | ColumnKind::ViaJsonb => ValueText::Json,
        }
    }
}

/// The staging table of one table shape.
#[derive(Debug, Clone)]
pub(super) struct StagePlan {
    /// `pg_temp.cdc_stage_<hash of the shape>`: tables of one shape share it.
    pub table: String,
    /// Creates it if this session has not yet (a rolled-back savepoint may have undone it).
    pub create: String,
    pub columns: Vec<StageColumn>,
}

/// The staging table's own columns, before the table's columns.
pub(super) const STAGED_META: &str = "_cdc_op text NOT NULL, _cdc_absent int2[] NOT NULL, \
    _cdc_commit_lsn bigint NOT NULL, _cdc_lsn bigint NOT NULL, _cdc_partition integer NOT NULL, \
    _cdc_offset bigint NOT NULL, _cdc_source_ts_ms bigint";

/// The table's columns with their types, category and kind, in table order.
const TABLE_COLUMNS: &str = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
        t.typcategory::text = 'A' OR coalesce(b.typtype, t.typtype) = 'c',
        coalesce(b.typname, t.typname)::text IN ('json', 'jsonb')
   FROM pg_attribute a
   JOIN pg_type t ON t.oid = a.atttypid
   LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype
  WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
  ORDER BY a.attnum";

impl StagePlan {
    /// Reads the shape of `mirror`'s table. A mirror stages its source columns; a mapped table
    /// stages all its columns but cdc-lake's own, so its filter sees every column by name.
    pub(super) async fn read(
        tx: &Transaction<'_>,
        sink: &'static str,
        mirror: &Mirror,
    ) -> Result<Self, SinkError> {
        let rows = tx
            .query(TABLE_COLUMNS, &[&mirror.qualified])
            .await
            .map_err(pg_err(
                sink,
                format!("reading the column types of {}", mirror.qualified),
            ))?;
        let mut columns = Vec::new();
        for r in &rows {
            let name: String = r.get(0);
            let staged = match mirror.mapped {
                None => mirror.has_column(&name),
                Some(_) => !name.starts_with(POSITION_COLUMN) && name != DELETED_COLUMN,
            };
            if !staged {
                continue;
            }
            let kind = match (r.get::<_, bool>(2), r.get::<_, bool>(3)) {
                (true, _) => ColumnKind::ViaJsonb,
                (false, true) => ColumnKind::Json,
                (false, false) => ColumnKind::Scalar,
            };
            let name = Ident::new(name).map_err(|e| SinkError::Encode {
                table: mirror.qualified.clone(),
                reason: format!("a column of {}: {e}", mirror.qualified),
            })?;
            columns.push(StageColumn {
                name,
                sql_type: r.get(1),
                kind,
            });
        }
        Ok(Self::new(columns))
    }

    pub(super) fn new(columns: Vec<StageColumn>) -> Self {
        let mut defs = String::from(STAGED_META);
        for (i, c) in columns.iter().enumerate() {
            let ty = match c.kind {
                ColumnKind::ViaJsonb => "jsonb",
                _ => c.sql_type.as_str(),
            };
            defs.push_str(&format!(", c{} {ty}", i + 1));
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        defs.hash(&mut hasher);
        let table = format!("pg_temp.cdc_stage_{:016x}", hasher.finish());
        let create =
            format!("CREATE TEMP TABLE IF NOT EXISTS {table} ({defs}) ON COMMIT DELETE ROWS");
        Self {
            table,
            create,
            columns,
        }
    }

    /// Whether both stage the same columns with the same types (the table name is a hash of
    /// the types; the names are compared here).
    pub(super) fn same_shape(&self, other: &StagePlan) -> bool {
        self.table == other.table
            && self.columns.len() == other.columns.len()
            && self
                .columns
                .iter()
                .zip(&other.columns)
                .all(|(a, b)| a.name == b.name)
    }

    /// The 0-based index of a column among the staged columns (its staged name is
    /// `c<index + 1>`).
    pub(super) fn index_of(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name.name() == column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(columns: &[(&str, &str)]) -> StagePlan {
        StagePlan::new(
            columns
                .iter()
                .map(|(name, ty)| StageColumn {
                    name: Ident::new(*name).unwrap(),
                    sql_type: ty.to_string(),
                    kind: ColumnKind::Scalar,
                })
                .collect(),
        )
    }

    #[test]
    fn a_changed_type_or_name_is_a_different_shape() {
        let before = plan(&[("id", "text"), ("total", "double precision")]);
        assert!(before.same_shape(&plan(&[("id", "text"), ("total", "double precision")])));
        assert!(!before.same_shape(&plan(&[("id", "text"), ("total", "text")])));
        assert!(!before.same_shape(&plan(&[("id", "text"), ("sum", "double precision")])));
        assert!(!before.same_shape(&plan(&[("id", "text")])));
    }
}
