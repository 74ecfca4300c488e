//! A data file as a Delta `add` action, from the Parquet footer the lake already wrote.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use bytes::Bytes;
use deltalake_core::kernel::Add;
use parquet::arrow::parquet_to_arrow_schema;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::statistics::Statistics;
use serde_json::{Map, Value};

/// The name of the partition column every lake table has (`date=YYYY-MM-DD/`).
pub const DATE_COLUMN: &str = "date";

/// One data file as a table's Delta commit records it.
#[derive(Debug, Clone)]
pub struct DeltaFile {
    pub add: Add,
    /// The file's columns (already in Delta's types; the partition column is not in files).
    pub schema: SchemaRef,
}

impl DeltaFile {
    /// `relative` is the file's path below the table root, as stored (`date=…/<name>`);
    /// `bytes` the whole object. Statistics come from the footer: row count, and min, max and
    /// null count of the top-level integer and timestamp columns (Kafka coordinates, `ts_ms`),
    /// which is what a reader prunes offset and time ranges by. Text columns get none: the
    /// writer may truncate text statistics, and a truncated max would hide rows from a filter.
    pub fn from_parquet(relative: &str, date: &str, bytes: &Bytes) -> Result<Self, String> {
        let meta = ParquetMetaDataReader::new()
            .parse_and_finish(bytes)
            .map_err(|e| format!("footer of {relative}: {e}"))?;
        let file = meta.file_metadata();
        let schema = parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata())
            .map_err(|e| format!("schema of {relative}: {e}"))?;
        let stats = statistics(&meta, &schema);
        Ok(Self {
            add: Add {
                // Delta paths are URIs: the `%` of an escaped name segment is escaped again.
                path: relative.replace('%', "%25"),
                partition_values: HashMap::from([(
                    DATE_COLUMN.to_string(),
                    Some(date.to_string()),
                )]),
                size: bytes.len() as i64,
                modification_time: chrono::Utc::now().timestamp_millis(),
                data_change: true,
                stats: Some(stats.to_string()),
                tags: None,
                deletion_vector: None,
                base_row_id: None,
                default_row_commit_version: None,
                clustering_provider: None,
            },
            schema: Arc::new(schema),
        })
    }
}

fn statistics(meta: &ParquetMetaData, schema: &arrow::datatypes::Schema) -> Value {
    let rows: i64 = meta.row_groups().iter().map(|rg| rg.num_rows()).sum();
    let (mut mins, mut maxs, mut nulls) = (Map::new(), Map::new(), Map::new());
    let leaves = meta.file_metadata().schema_descr();
    for field in schema.fields() {
        let render: fn(i64, &DataType) -> Value = match field.data_type() {
            DataType::Int16 | DataType::Int32 | DataType::Int64 => |v, _| Value::from(v),
            DataType::Timestamp(TimeUnit::Microsecond, _) => timestamp_text,
            _ => continue,
        };
        // A top-level primitive column is the leaf whose path is just its name.
        let Some(leaf) = (0..leaves.num_columns()).find(|i| {
            let column = leaves.column(*i);
            let path = column.path().parts();
            path.len() == 1 && path[0] == *field.name()
        }) else {
            continue;
        };
        let (mut min, mut max, mut null_count) = (None::<i64>, None::<i64>, Some(0u64));
        for rg in meta.row_groups() {
            let Some(s) = rg.column(leaf).statistics() else {
                null_count = None;
                min = None;
                max = None;
                break;
            };
            let (lo, hi) = match s {
                Statistics::Int32(v) => (
                    v.min_opt().map(|x| i64::from(*x)),
                    v.max_opt().map(|x| i64::from(*x)),
                ),
                Statistics::Int64(v) => (v.min_opt().copied(), v.max_opt().copied()),
                _ => (None, None),
            };
            null_count = null_count.zip(s.null_count_opt()).map(|(a, b)| a + b);
            if let Some(lo) = lo {
                min = Some(min.map_or(lo, |m| m.min(lo)));
            }
            if let Some(hi) = hi {
                max = Some(max.map_or(hi, |m| m.max(hi)));
            }
        }
        let name = field.name().clone();
        if let (Some(lo), Some(hi)) = (min, max) {
            let (lo, hi) = (render(lo, field.data_type()), render(hi, field.data_type()));
            if !lo.is_null() && !hi.is_null() {
                mins.insert(name.clone(), lo);
                maxs.insert(name.clone(), hi);
            }
        }
        if let Some(n) = null_count {
            nulls.insert(name, Value::from(n));
        }
    }
    serde_json::json!({
        "numRecords": rows,
        "minValues": mins,
        "maxValues": maxs,
        "nullCount": nulls,
    })
}

/// Delta's statistics form of a microsecond timestamp (ISO 8601; `Z` for UTC ones). Only years
/// 1 to 9999 have one: Delta readers parse four-digit years only (delta-kernel refused the
/// whole log, and with it every later commit, over `-5953-10-25T…`), and a calendar cannot show
/// the lake's ±infinity. Such a file gets no min/max for that column; its values stay exact.
fn timestamp_text(micros: i64, ty: &DataType) -> Value {
    let Some(t) = chrono::DateTime::from_timestamp_micros(micros)
        .filter(|t| (1..=9999).contains(&chrono::Datelike::year(t)))
    else {
        return Value::Null;
    };
    let utc = matches!(ty, DataType::Timestamp(_, Some(_)));
    Value::from(if utc {
        t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    })
}
