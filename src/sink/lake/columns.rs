//! The typed `before`/`after` columns of a lake file: each column's Arrow type, and its values
//! from the row maps of the file's changes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Decimal256Builder,
    DurationMicrosecondBuilder, Float32Builder, Float64Builder, Int16Builder, Int32Builder,
    Int64Builder, ListArray, StringBuilder, StructArray, Time64MicrosecondBuilder,
    TimestampMicrosecondBuilder, TimestampMillisecondBuilder, TimestampNanosecondBuilder,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::i256;
use arrow::datatypes::{DataType, Field, Fields, TimeUnit as ArrowUnit};
use base64::Engine as _;
use serde_json::{Map, Value};

use crate::envelope::value::{
    decimal_unscaled, float_value, infinity, sign_extend, temporal_i64, to_sql_json,
    UNAVAILABLE_VALUE,
};
use crate::envelope::{ColumnType, RowSchema, TimeUnit};

/// The Arrow type a column is stored as in the lake.
pub fn arrow_type(ty: &ColumnType) -> DataType {
    match ty {
        ColumnType::Boolean => DataType::Boolean,
        ColumnType::Int16 => DataType::Int16,
        ColumnType::Int32 => DataType::Int32,
        ColumnType::Int64 => DataType::Int64,
        ColumnType::Float32 => DataType::Float32,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::Decimal { precision, scale }
            if *scale >= 0
                && precision.is_none_or(|p| p <= 38 && i16::from(*scale) <= i16::from(p)) =>
        {
            DataType::Decimal128(precision.unwrap_or(38), *scale)
        }
        ColumnType::Decimal {
            precision: Some(p),
            scale,
        } if *scale >= 0 && i16::from(*scale) <= i16::from(*p) && *p <= 76 => {
            DataType::Decimal256(*p, *scale)
        }
        ColumnType::WideInteger => DataType::Decimal256(76, 0),
        ColumnType::Bytes => DataType::Binary,
        ColumnType::Date => DataType::Date32,
        ColumnType::Time(_) | ColumnType::TimeTz => DataType::Time64(ArrowUnit::Microsecond),
        ColumnType::Interval => DataType::Duration(ArrowUnit::Microsecond),
        ColumnType::Array(elem) => match arrow_type(elem) {
            // Element types that are text in the lake keep the whole array as JSON text.
            DataType::Utf8 => DataType::Utf8,
            item => DataType::List(Arc::new(Field::new("item", item, true))),
        },
        ColumnType::Timestamp(TimeUnit::Millis) => {
            DataType::Timestamp(ArrowUnit::Millisecond, None)
        }
        ColumnType::Timestamp(TimeUnit::Micros) => {
            DataType::Timestamp(ArrowUnit::Microsecond, None)
        }
        ColumnType::Timestamp(TimeUnit::Nanos) => DataType::Timestamp(ArrowUnit::Nanosecond, None),
        ColumnType::TimestampTz => DataType::Timestamp(ArrowUnit::Microsecond, Some("UTC".into())),
        // Variable-scale decimals, text, uuid, json and unknown: exact text.
        _ => DataType::Utf8,
    }
}

/// A value for the lake: null for SQL NULL and for TOAST placeholders (unknown here; the
/// envelope column still holds what was sent).
fn present(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null() && v.as_str() != Some(UNAVAILABLE_VALUE))
}

/// A timestamp in its wire unit, with Debezium's ±infinity as the extremes DuckDB reads as
/// ±infinity.
fn wire_timestamp(ty: &ColumnType, v: &Value) -> Option<i64> {
    match infinity(ty, v) {
        Some(inf) => Some(inf.lake_extreme(ty)),
        None => v.as_i64(),
    }
}

/// Connect decimal bytes as a 256-bit unscaled value (precision 39 to 76).
fn decimal_i256(b64: &str) -> Option<i256> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    sign_extend::<32>(&bytes).map(i256::from_be_bytes)
}

/// A value's exact text in the lake. Text as sent needs no conversion and is borrowed, not
/// copied (most of a table's text columns, on every row).
fn text<'v>(ty: &ColumnType, v: &'v Value) -> Cow<'v, str> {
    match (ty, v) {
        (
            ColumnType::Text | ColumnType::Uuid | ColumnType::TimeTz | ColumnType::Unknown,
            Value::String(s),
        ) => Cow::Borrowed(s),
        _ => Cow::Owned(match to_sql_json(ty, v) {
            Ok(Value::String(s)) => s,
            Ok(other) => other.to_string(),
            // Kept as sent (e.g. a JSON document jsonb cannot hold): the lake's text is exact.
            Err(_) => v.as_str().map_or_else(|| v.to_string(), str::to_string),
        }),
    }
}

/// Builds one typed column from the rows' values. Values that do not match the declared type
/// become null here (and are still in the envelope column).
fn build_column(ty: &ColumnType, values: &[Option<&Value>]) -> ArrayRef {
    let values = values.iter().map(|v| present(*v));
    macro_rules! build {
        ($builder:expr, $conv:expr) => {{
            let mut b = $builder;
            for v in values {
                b.append_option(v.and_then($conv));
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    if *ty == ColumnType::WideInteger {
        // From the JSON literal's digits (Int64 values widened into the column included).
        let b = Decimal256Builder::new()
            .with_precision_and_scale(76, 0)
            .expect("valid precision");
        return build!(b, |v: &Value| v
            .as_number()
            .and_then(|n| i256::from_string(&n.to_string())));
    }
    match arrow_type(ty) {
        DataType::Boolean => build!(BooleanBuilder::new(), Value::as_bool),
        DataType::Int16 => build!(Int16Builder::new(), |v: &Value| v
            .as_i64()
            .and_then(|n| i16::try_from(n).ok())),
        DataType::Int32 => build!(Int32Builder::new(), |v: &Value| v
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())),
        DataType::Int64 => build!(Int64Builder::new(), Value::as_i64),
        DataType::Float32 => build!(Float32Builder::new(), |v: &Value| float_value(v)
            .map(|f| f as f32)),
        DataType::Float64 => build!(Float64Builder::new(), float_value),
        DataType::Decimal128(p, s) => {
            let b = Decimal128Builder::new()
                .with_precision_and_scale(p, s)
                .expect("valid precision");
            build!(b, |v: &Value| v
                .as_str()
                .and_then(|s| decimal_unscaled(s).ok()))
        }
        DataType::Decimal256(p, s) => {
            let b = Decimal256Builder::new()
                .with_precision_and_scale(p, s)
                .expect("valid precision");
            build!(b, |v: &Value| v.as_str().and_then(decimal_i256))
        }
        DataType::Binary => build!(BinaryBuilder::new(), |v: &Value| v
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())),
        DataType::Date32 => build!(Date32Builder::new(), |v: &Value| temporal_i64(ty, v)
            .ok()
            .and_then(|d| i32::try_from(d).ok())),
        DataType::Time64(_) => build!(Time64MicrosecondBuilder::new(), |v: &Value| temporal_i64(
            ty, v
        )
        .ok()),
        DataType::Duration(_) => build!(DurationMicrosecondBuilder::new(), |v: &Value| {
            temporal_i64(ty, v).ok()
        }),
        // Timestamps keep their wire unit; ±infinity become the unit's extremes.
        DataType::Timestamp(ArrowUnit::Millisecond, _) => {
            build!(TimestampMillisecondBuilder::new(), |v: &Value| {
                wire_timestamp(ty, v)
            })
        }
        DataType::Timestamp(ArrowUnit::Nanosecond, _) => {
            build!(TimestampNanosecondBuilder::new(), |v: &Value| {
                wire_timestamp(ty, v)
            })
        }
        DataType::Timestamp(ArrowUnit::Microsecond, Some(tz)) => build!(
            TimestampMicrosecondBuilder::new().with_timezone(tz),
            |v: &Value| temporal_i64(ty, v).ok()
        ),
        DataType::Timestamp(..) => {
            build!(TimestampMicrosecondBuilder::new(), |v: &Value| {
                wire_timestamp(ty, v)
            })
        }
        DataType::List(item) => {
            let ColumnType::Array(elem) = ty else {
                unreachable!("only arrays map to lists")
            };
            // One child array of every element, cut into rows by offsets.
            let rows: Vec<Option<&Vec<Value>>> =
                values.map(|v| v.and_then(Value::as_array)).collect();
            let elements: Vec<Option<&Value>> = rows
                .iter()
                .flatten()
                .flat_map(|items| items.iter().map(Some))
                .collect();
            let child = build_column(elem, &elements);
            let offsets =
                OffsetBuffer::from_lengths(rows.iter().map(|r| r.map_or(0, |items| items.len())));
            let nulls = NullBuffer::from(rows.iter().map(Option::is_some).collect::<Vec<bool>>());
            Arc::new(ListArray::new(item, offsets, child, Some(nulls))) as ArrayRef
        }
        _ => build!(
            StringBuilder::with_capacity(values.len(), 0),
            |v: &Value| Some(text(ty, v))
        ),
    }
}

/// Each row's value of each column, column by column (None: the row or the value is absent).
/// Rows of one schema list their columns in the schema's order, so each key is compared with
/// the column at its position first; only a row in another order is looked up by name.
/// (Looking every value up by name hashed each key of every row, a tenth of the lake's time.)
/// The index costs 8 bytes per cell, small beside the buffered values it points into.
fn values_by_column<'r>(
    schema: &RowSchema,
    rows: &[Option<&'r Map<String, Value>>],
) -> Vec<Vec<Option<&'r Value>>> {
    let width = schema.columns.len();
    let mut columns = vec![vec![None; rows.len()]; width];
    let mut by_name: Option<HashMap<&str, usize>> = None;
    for (r, row) in rows.iter().enumerate() {
        for (position, (name, value)) in row.iter().flat_map(|m| m.iter()).enumerate() {
            let column = if schema
                .columns
                .get(position)
                .is_some_and(|c| c.name == *name)
            {
                Some(position)
            } else {
                let by_name = by_name.get_or_insert_with(|| {
                    let names = schema.columns.iter().enumerate();
                    names.map(|(i, c)| (c.name.as_str(), i)).collect()
                });
                by_name.get(name.as_str()).copied()
            };
            if let Some(c) = column {
                columns[c][r] = Some(value);
            }
        }
    }
    columns
}

pub(super) fn row_struct(
    schema: &RowSchema,
    rows: &[Option<&Map<String, Value>>],
) -> (ArrayRef, Fields) {
    let fields: Fields = schema
        .columns
        .iter()
        .map(|c| Field::new(&c.name, arrow_type(&c.ty), true))
        .collect();
    let arrays: Vec<ArrayRef> = schema
        .columns
        .iter()
        .zip(values_by_column(schema, rows))
        .map(|(c, values)| build_column(&c.ty, &values))
        .collect();
    let nulls = NullBuffer::from(rows.iter().map(Option::is_some).collect::<Vec<bool>>());
    let array = if fields.is_empty() {
        Arc::new(StructArray::new_empty_fields(rows.len(), Some(nulls))) as ArrayRef
    } else {
        Arc::new(StructArray::new(fields.clone(), arrays, Some(nulls))) as ArrayRef
    };
    (array, fields)
}
