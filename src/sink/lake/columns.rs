//! The typed `before`/`after` columns of a lake file: each column's Arrow type, and its values,
//! appended from each change's row maps as the change reaches the lake (so the lake holds a
//! change as column values, not as its maps, until the file is written).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    new_empty_array, new_null_array, Array, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder,
    Decimal128Builder, Decimal256Builder, DurationMicrosecondBuilder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, ListArray, StringBuilder,
    StructArray, Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
    TimestampMillisecondBuilder, TimestampNanosecondBuilder,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::compute::{cast, concat};
use arrow::datatypes::i256;
use arrow::datatypes::{DataType, Field, FieldRef, Fields, TimeUnit as ArrowUnit};
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

/// One typed column of `before` or `after`, appended a row at a time as changes reach the
/// lake. Values that do not match the column's type become null here (they are still in the
/// envelope column).
struct ColumnBuilder {
    ty: ColumnType,
    values: Values,
}

/// The Arrow builder behind a [`ColumnBuilder`], one per lake type.
enum Values {
    Boolean(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal128(Decimal128Builder),
    Decimal256(Decimal256Builder),
    /// Integers wider than `i64`, from the JSON literal's digits.
    WideInteger(Decimal256Builder),
    Binary(BinaryBuilder),
    Date32(Date32Builder),
    Time64(Time64MicrosecondBuilder),
    Duration(DurationMicrosecondBuilder),
    TimestampMillis(TimestampMillisecondBuilder),
    TimestampMicros(TimestampMicrosecondBuilder),
    TimestampNanos(TimestampNanosecondBuilder),
    TimestampMicrosUtc(TimestampMicrosecondBuilder),
    /// Every element of every row in one child column, cut into rows by their lengths.
    List {
        item: FieldRef,
        elements: Box<ColumnBuilder>,
        lengths: Vec<usize>,
        valid: Vec<bool>,
    },
    Text(StringBuilder),
}

/// Rows a fresh column has room for. Small: a partition can hold a file for each of
/// thousands of tables at once, and builders grow by doubling.
pub(super) const INITIAL_ROWS: usize = 64;

impl ColumnBuilder {
    fn new(ty: &ColumnType) -> Self {
        let n = INITIAL_ROWS;
        let decimal256 = |p, s| {
            Decimal256Builder::with_capacity(n)
                .with_precision_and_scale(p, s)
                .expect("valid precision")
        };
        let values = if *ty == ColumnType::WideInteger {
            Values::WideInteger(decimal256(76, 0))
        } else {
            match arrow_type(ty) {
                DataType::Boolean => Values::Boolean(BooleanBuilder::with_capacity(n)),
                DataType::Int16 => Values::Int16(Int16Builder::with_capacity(n)),
                DataType::Int32 => Values::Int32(Int32Builder::with_capacity(n)),
                DataType::Int64 => Values::Int64(Int64Builder::with_capacity(n)),
                DataType::Float32 => Values::Float32(Float32Builder::with_capacity(n)),
                DataType::Float64 => Values::Float64(Float64Builder::with_capacity(n)),
                DataType::Decimal128(p, s) => Values::Decimal128(
                    Decimal128Builder::with_capacity(n)
                        .with_precision_and_scale(p, s)
                        .expect("valid precision"),
                ),
                DataType::Decimal256(p, s) => Values::Decimal256(decimal256(p, s)),
                DataType::Binary => Values::Binary(BinaryBuilder::with_capacity(n, 0)),
                DataType::Date32 => Values::Date32(Date32Builder::with_capacity(n)),
                DataType::Time64(_) => Values::Time64(Time64MicrosecondBuilder::with_capacity(n)),
                DataType::Duration(_) => {
                    Values::Duration(DurationMicrosecondBuilder::with_capacity(n))
                }
                DataType::Timestamp(ArrowUnit::Millisecond, _) => {
                    Values::TimestampMillis(TimestampMillisecondBuilder::with_capacity(n))
                }
                DataType::Timestamp(ArrowUnit::Nanosecond, _) => {
                    Values::TimestampNanos(TimestampNanosecondBuilder::with_capacity(n))
                }
                DataType::Timestamp(ArrowUnit::Microsecond, Some(tz)) => {
                    Values::TimestampMicrosUtc(
                        TimestampMicrosecondBuilder::with_capacity(n).with_timezone(tz),
                    )
                }
                DataType::Timestamp(..) => {
                    Values::TimestampMicros(TimestampMicrosecondBuilder::with_capacity(n))
                }
                DataType::List(item) => {
                    let ColumnType::Array(elem) = ty else {
                        unreachable!("only arrays map to lists")
                    };
                    Values::List {
                        item,
                        elements: Box::new(ColumnBuilder::new(elem)),
                        lengths: Vec::new(),
                        valid: Vec::new(),
                    }
                }
                _ => Values::Text(StringBuilder::with_capacity(n, 0)),
            }
        };
        Self {
            ty: ty.clone(),
            values,
        }
    }

    fn ty(&self) -> &ColumnType {
        &self.ty
    }

    /// Appends one row's value (None: the row has no such column).
    fn append(&mut self, v: Option<&Value>) {
        let Self { ty, values } = self;
        let v = present(v);
        match values {
            Values::Boolean(b) => b.append_option(v.and_then(Value::as_bool)),
            Values::Int16(b) => {
                b.append_option(v.and_then(Value::as_i64).and_then(|n| n.try_into().ok()))
            }
            Values::Int32(b) => {
                b.append_option(v.and_then(Value::as_i64).and_then(|n| n.try_into().ok()))
            }
            Values::Int64(b) => b.append_option(v.and_then(Value::as_i64)),
            Values::Float32(b) => b.append_option(v.and_then(float_value).map(|f| f as f32)),
            Values::Float64(b) => b.append_option(v.and_then(float_value)),
            Values::Decimal128(b) => b.append_option(
                v.and_then(Value::as_str)
                    .and_then(|s| decimal_unscaled(s).ok()),
            ),
            Values::Decimal256(b) => {
                b.append_option(v.and_then(Value::as_str).and_then(decimal_i256))
            }
            Values::WideInteger(b) => b.append_option(
                v.and_then(Value::as_number)
                    .and_then(|n| i256::from_string(n.as_str())),
            ),
            Values::Binary(b) => b.append_option(
                v.and_then(Value::as_str)
                    .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok()),
            ),
            Values::Date32(b) => b.append_option(
                v.and_then(|v| temporal_i64(ty, v).ok())
                    .and_then(|d| i32::try_from(d).ok()),
            ),
            Values::Time64(b) => b.append_option(v.and_then(|v| temporal_i64(ty, v).ok())),
            Values::Duration(b) => b.append_option(v.and_then(|v| temporal_i64(ty, v).ok())),
            // Timestamps keep their wire unit; ±infinity become the unit's extremes.
            Values::TimestampMillis(b) => b.append_option(v.and_then(|v| wire_timestamp(ty, v))),
            Values::TimestampMicros(b) => b.append_option(v.and_then(|v| wire_timestamp(ty, v))),
            Values::TimestampNanos(b) => b.append_option(v.and_then(|v| wire_timestamp(ty, v))),
            Values::TimestampMicrosUtc(b) => {
                b.append_option(v.and_then(|v| temporal_i64(ty, v).ok()))
            }
            Values::List {
                elements,
                lengths,
                valid,
                ..
            } => match v.and_then(Value::as_array) {
                Some(items) => {
                    for item in items {
                        elements.append(Some(item));
                    }
                    lengths.push(items.len());
                    valid.push(true);
                }
                None => {
                    lengths.push(0);
                    valid.push(false);
                }
            },
            Values::Text(b) => b.append_option(v.map(|v| text(ty, v))),
        }
    }

    /// The rows appended since the last call, as one array of [`arrow_type`]; the builder is
    /// then empty.
    fn finish(&mut self) -> ArrayRef {
        match &mut self.values {
            Values::Boolean(b) => Arc::new(b.finish()),
            Values::Int16(b) => Arc::new(b.finish()),
            Values::Int32(b) => Arc::new(b.finish()),
            Values::Int64(b) => Arc::new(b.finish()),
            Values::Float32(b) => Arc::new(b.finish()),
            Values::Float64(b) => Arc::new(b.finish()),
            Values::Decimal128(b) => Arc::new(b.finish()),
            Values::Decimal256(b) | Values::WideInteger(b) => Arc::new(b.finish()),
            Values::Binary(b) => Arc::new(b.finish()),
            Values::Date32(b) => Arc::new(b.finish()),
            Values::Time64(b) => Arc::new(b.finish()),
            Values::Duration(b) => Arc::new(b.finish()),
            Values::TimestampMillis(b) => Arc::new(b.finish()),
            Values::TimestampMicros(b) | Values::TimestampMicrosUtc(b) => Arc::new(b.finish()),
            Values::TimestampNanos(b) => Arc::new(b.finish()),
            Values::List {
                item,
                elements,
                lengths,
                valid,
            } => {
                let child = elements.finish();
                let offsets = OffsetBuffer::from_lengths(std::mem::take(lengths));
                let nulls = NullBuffer::from(std::mem::take(valid));
                Arc::new(ListArray::new(item.clone(), offsets, child, Some(nulls)))
            }
            Values::Text(b) => Arc::new(b.finish()),
        }
    }
}

/// Adds a column's `fresh` rows to the pieces it kept and joins them into one array of `ty`,
/// which is then the only piece kept (so a retried commit encodes the same rows again). Pieces
/// of an earlier, narrower type are cast: the widenings a file allows (integer to float, to a
/// wider integer, or to exact text; unknown to anything) give the value a direct conversion
/// would. The fresh rows are kept before anything can fail, so an error loses none.
pub(super) fn join_pieces(
    pieces: &mut Vec<ArrayRef>,
    fresh: ArrayRef,
    ty: &DataType,
) -> Result<ArrayRef, String> {
    pieces.push(fresh);
    pieces.retain(|p| !p.is_empty());
    let typed: Vec<ArrayRef> = pieces
        .iter()
        .map(|p| {
            if p.data_type() == ty {
                Ok(p.clone())
            } else if p.null_count() == p.len() {
                Ok(new_null_array(ty, p.len()))
            } else {
                cast(p, ty).map_err(|e| e.to_string())
            }
        })
        .collect::<Result<_, _>>()?;
    let all = match typed.as_slice() {
        [] => new_empty_array(ty),
        [one] => one.clone(),
        many => {
            let many: Vec<&dyn Array> = many.iter().map(|p| p.as_ref()).collect();
            concat(&many).map_err(|e| e.to_string())?
        }
    };
    *pieces = vec![all.clone()];
    Ok(all)
}

/// A column of a file whose type may widen while the file fills (an inferred integer column
/// that later sees a float): the rows already built under earlier types, and a builder of the
/// current type for the rows since.
struct WideningColumn {
    done: Vec<ArrayRef>,
    open: ColumnBuilder,
}

impl WideningColumn {
    /// Every row so far as one array of the column's current type ([`join_pieces`]).
    fn finish(&mut self) -> Result<ArrayRef, String> {
        let ty = arrow_type(self.open.ty());
        let fresh = self.open.finish();
        join_pieces(&mut self.done, fresh, &ty)
    }
}

/// The `before` or `after` struct of a lake file, built a row at a time; its columns follow
/// the file's schema, which only grows (new columns, wider types) while the file fills.
#[derive(Default)]
pub(super) struct RowColumns {
    columns: Vec<WideningColumn>,
    /// Whether each row is present (a create has no `before`).
    valid: Vec<bool>,
    /// Column positions by name, for rows that list their columns in another order.
    by_name: Option<HashMap<String, usize>>,
}

impl RowColumns {
    /// Follows the file's schema after a merge: widened columns start a piece of their new
    /// type, and new columns are null in the rows before them.
    pub(super) fn fit(&mut self, schema: &RowSchema) {
        let rows = self.valid.len();
        for (i, column) in schema.columns.iter().enumerate() {
            match self.columns.get_mut(i) {
                Some(c) if c.open.ty() == &column.ty => {}
                Some(c) => {
                    let mut narrower =
                        std::mem::replace(&mut c.open, ColumnBuilder::new(&column.ty));
                    c.done.push(narrower.finish());
                }
                None => {
                    let before = new_null_array(&arrow_type(&column.ty), rows);
                    self.columns.push(WideningColumn {
                        done: vec![before],
                        open: ColumnBuilder::new(&column.ty),
                    });
                    self.by_name = None;
                }
            }
        }
    }

    /// Appends one row (None: the change has no such row). Rows of one schema list their
    /// columns in the schema's order, so each key is compared with the next column first; only
    /// a row in another order looks its keys up by name. (Looking every value up by name
    /// hashed each key of every row, a tenth of the lake's time.)
    pub(super) fn push(&mut self, schema: &RowSchema, row: Option<&Map<String, Value>>) {
        self.valid.push(row.is_some());
        let width = self.columns.len();
        let mut in_order = 0;
        let mut out_of_order: Option<Vec<Option<&Value>>> = None;
        for (name, value) in row.into_iter().flatten() {
            if out_of_order.is_none()
                && schema
                    .columns
                    .get(in_order)
                    .is_some_and(|c| c.name == *name)
            {
                self.columns[in_order].open.append(Some(value));
                in_order += 1;
                continue;
            }
            let by_name = self.by_name.get_or_insert_with(|| {
                let names = schema.columns.iter().enumerate();
                names.map(|(i, c)| (c.name.clone(), i)).collect()
            });
            // Keys are unique, so a key found here is one of the columns not yet appended.
            if let Some(&c) = by_name.get(name.as_str()) {
                out_of_order.get_or_insert_with(|| vec![None; width])[c] = Some(value);
            }
        }
        for c in in_order..width {
            let value = out_of_order.as_ref().and_then(|v| v[c]);
            self.columns[c].open.append(value);
        }
    }

    /// Every row so far as one struct array of the schema's columns, and its fields.
    pub(super) fn finish(&mut self, schema: &RowSchema) -> Result<(ArrayRef, Fields), String> {
        let fields: Fields = schema
            .columns
            .iter()
            .map(|c| Field::new(&c.name, arrow_type(&c.ty), true))
            .collect();
        let arrays: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(WideningColumn::finish)
            .collect::<Result<_, _>>()?;
        let nulls = NullBuffer::from(self.valid.clone());
        let array = if fields.is_empty() {
            Arc::new(StructArray::new_empty_fields(self.valid.len(), Some(nulls))) as ArrayRef
        } else {
            Arc::new(
                StructArray::try_new(fields.clone(), arrays, Some(nulls))
                    .map_err(|e| e.to_string())?,
            ) as ArrayRef
        };
        Ok((array, fields))
    }
}
