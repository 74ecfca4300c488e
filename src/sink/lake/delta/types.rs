//! The lake's Arrow types as Delta Lake can hold them.
//!
//! Delta has no time of day, no duration, no decimal above 38 digits and only microsecond
//! timestamps. A file of a Delta table stores such columns as a Delta type that keeps every
//! digit (docs/fidelity.md has the table):
//!
//! | lake (Arrow) | Delta | value |
//! |---|---|---|
//! | `time64(µs)` | `long` | microseconds since midnight |
//! | `duration(µs)` | `long` | microseconds |
//! | `decimal256(p, s)` | `string` | the exact decimal text |
//! | `timestamp(ms[, UTC])` | `timestamp_ntz` / `timestamp` | the same instant in µs; ±infinity stay the extremes |
//! | `timestamp(ns)` | `long` | nanoseconds since the epoch (µs would drop digits) |
//!
//! Everything else (booleans, integers, floats, decimal128, text, binary, date, µs timestamps,
//! structs and lists of these) is stored as it is.

use std::sync::Arc;

use arrow::array::{
    new_null_array, Array, ArrayRef, AsArray, ListArray, StructArray, TimestampMicrosecondArray,
};
use arrow::buffer::NullBuffer;
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Field, FieldRef, Fields, Schema, TimeUnit, TimestampMillisecondType,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

/// The type a lake column of type `ty` is stored as in a Delta table.
pub fn delta_type(ty: &DataType) -> DataType {
    match ty {
        DataType::Time64(_) | DataType::Duration(_) => DataType::Int64,
        DataType::Timestamp(TimeUnit::Nanosecond, _) => DataType::Int64,
        DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Microsecond, tz.clone()),
        DataType::Decimal256(..) => DataType::Utf8,
        DataType::Struct(fields) => DataType::Struct(delta_fields(fields)),
        DataType::List(item) => DataType::List(delta_field(item)),
        other => other.clone(),
    }
}

fn delta_field(f: &FieldRef) -> FieldRef {
    Arc::new(
        Field::new(f.name(), delta_type(f.data_type()), f.is_nullable())
            .with_metadata(f.metadata().clone()),
    )
}

fn delta_fields(fields: &Fields) -> Fields {
    fields.iter().map(delta_field).collect()
}

/// A batch of lake rows with every column in its Delta type ([`delta_type`]).
pub fn to_delta(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    if schema
        .fields()
        .iter()
        .all(|f| delta_type(f.data_type()) == *f.data_type())
    {
        return Ok(batch.clone());
    }
    let fields = delta_fields(schema.fields());
    let columns = batch
        .columns()
        .iter()
        .map(convert)
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
        columns,
    )
}

/// One array in its Delta type. Same-width integer types are reinterpreted (their values are
/// already the documented unit); millisecond timestamps are scaled; wide decimals become text.
fn convert(array: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    let target = delta_type(array.data_type());
    if target == *array.data_type() {
        return Ok(array.clone());
    }
    match array.data_type() {
        DataType::Time64(_)
        | DataType::Duration(_)
        | DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            let data = array
                .to_data()
                .into_builder()
                .data_type(DataType::Int64)
                .build()?;
            Ok(arrow::array::make_array(data))
        }
        DataType::Timestamp(TimeUnit::Millisecond, tz) => {
            let millis = array.as_primitive::<TimestampMillisecondType>();
            let micros: TimestampMicrosecondArray = millis.unary(millis_to_micros);
            Ok(Arc::new(micros.with_timezone_opt(tz.clone())))
        }
        DataType::Struct(_) => {
            let s = array.as_struct();
            let DataType::Struct(fields) = target else {
                unreachable!("a struct maps to a struct")
            };
            let children = s
                .columns()
                .iter()
                .map(convert)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Arc::new(StructArray::try_new(
                fields,
                children,
                s.nulls().cloned(),
            )?))
        }
        DataType::List(_) => {
            let l = array.as_list::<i32>();
            let DataType::List(item) = target else {
                unreachable!("a list maps to a list")
            };
            Ok(Arc::new(ListArray::try_new(
                item,
                l.offsets().clone(),
                convert(l.values())?,
                l.nulls().cloned(),
            )?))
        }
        _ => cast(array, &target),
    }
}

/// A file for a Delta table whose `before`/`after` has a column the table already types
/// differently (a source `ALTER COLUMN … TYPE`, or an inferred type that changed): the file
/// stores it as `<name>__<new type>` (`price__string`), a column of its own, so the table's
/// schema stays one every file fits. The values stay exact, and `envelope` is unchanged.
///
/// A column with no value in the file (schemaless JSON types a null as text, as in a delete's
/// `before`) has no type of its own: it takes the table's type, so a delete neither adds a
/// `__string` column nor gives its file a shape that compaction cannot merge with its
/// neighbours.
pub fn rename_conflicts(batch: RecordBatch, table: &Schema) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let mut fields: Vec<FieldRef> = schema.fields().iter().cloned().collect();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    let mut changed = false;
    for (i, field) in schema.fields().iter().enumerate() {
        let (DataType::Struct(file_row), Ok(table_field)) =
            (field.data_type(), table.field_with_name(field.name()))
        else {
            continue;
        };
        let DataType::Struct(table_row) = table_field.data_type() else {
            continue;
        };
        let s = columns[i].as_struct();
        let mut children = s.columns().to_vec();
        let row: Fields = file_row
            .iter()
            .zip(&mut children)
            .map(|(f, child)| match table_row.find(f.name()) {
                Some((_, t)) if t.data_type() != f.data_type() => {
                    changed = true;
                    if holds_no_value(s.nulls(), child) {
                        *child = new_null_array(t.data_type(), child.len());
                        return Arc::new(f.as_ref().clone().with_data_type(t.data_type().clone()));
                    }
                    let name = format!("{}__{}", f.name(), type_name(f.data_type()));
                    Arc::new(f.as_ref().clone().with_name(name))
                }
                _ => f.clone(),
            })
            .collect();
        if row != *file_row {
            columns[i] = Arc::new(StructArray::try_new(
                row.clone(),
                children,
                s.nulls().cloned(),
            )?);
            fields[i] = Arc::new(field.as_ref().clone().with_data_type(DataType::Struct(row)));
        }
    }
    if !changed {
        return Ok(batch);
    }
    RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
        columns,
    )
}

/// Whether every row of a struct's `child` is null, or in a null struct.
fn holds_no_value(parent: Option<&NullBuffer>, child: &ArrayRef) -> bool {
    // A row has a value only where both the struct and the child are valid.
    match NullBuffer::union(parent, child.logical_nulls().as_ref()) {
        Some(valid) => valid.null_count() == valid.len(),
        None => child.is_empty(),
    }
}

/// Delta's name of a type, as a column name suffix.
fn type_name(ty: &DataType) -> String {
    match ty {
        DataType::Boolean => "boolean".into(),
        DataType::Int8 => "byte".into(),
        DataType::Int16 => "short".into(),
        DataType::Int32 => "integer".into(),
        DataType::Int64 => "long".into(),
        DataType::Float32 => "float".into(),
        DataType::Float64 => "double".into(),
        DataType::Utf8 => "string".into(),
        DataType::Binary => "binary".into(),
        DataType::Date32 => "date".into(),
        DataType::Timestamp(_, Some(_)) => "timestamp".into(),
        DataType::Timestamp(_, None) => "timestamp_ntz".into(),
        DataType::Decimal128(p, s) => format!("decimal_{p}_{s}"),
        DataType::List(item) => format!("array_{}", type_name(item.data_type())),
        DataType::Struct(_) => "struct".into(),
        other => other.to_string().to_lowercase(),
    }
}

/// `table` with the columns of `file` it lacks added (inside `before`/`after` too), in the
/// table's order and then the file's. A column the file types differently keeps the table's
/// type; the conflict is logged with the table and the column (values stay exact in the file
/// and in `envelope`).
pub fn merge_schema(table: &Schema, file: &Schema, table_name: &str) -> Schema {
    Schema::new_with_metadata(
        merge_fields(table.fields(), file.fields(), table_name, ""),
        table.metadata().clone(),
    )
}

fn merge_fields(table: &Fields, file: &Fields, table_name: &str, parent: &str) -> Fields {
    let mut out: Vec<FieldRef> = table.iter().cloned().collect();
    for f in file {
        let column = format!("{parent}{}", f.name());
        match out.iter().position(|t| t.name() == f.name()) {
            None => out.push(Arc::new(f.as_ref().clone().with_nullable(true))),
            Some(i) => match (out[i].data_type(), f.data_type()) {
                (DataType::Struct(a), DataType::Struct(b)) => {
                    let merged = merge_fields(a, b, table_name, &format!("{column}."));
                    out[i] = Arc::new(
                        out[i]
                            .as_ref()
                            .clone()
                            .with_data_type(DataType::Struct(merged)),
                    );
                }
                (a, b) if a != b => {
                    tracing::warn!(table = table_name, column, table_type = %a, file_type = %b,
                        "a lake file types a column differently than its Delta table; the table keeps its type");
                }
                _ => {}
            },
        }
    }
    out.into()
}

/// Milliseconds to microseconds. The lake writes ±infinity as the extremes of i64 (what DuckDB
/// reads as ±infinity in every unit), so they stay extremes instead of overflowing.
fn millis_to_micros(ms: i64) -> i64 {
    if ms == i64::MAX || ms == -i64::MAX || ms == i64::MIN {
        ms
    } else {
        ms.saturating_mul(1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Decimal256Array, DurationMicrosecondArray, Int64Array, StringArray, Time64MicrosecondArray,
        TimestampMillisecondArray, TimestampNanosecondArray,
    };
    use arrow::datatypes::i256;

    fn one_column(name: &str, array: ArrayRef) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new(
                name,
                array.data_type().clone(),
                true,
            )])),
            vec![array],
        )
        .unwrap()
    }

    #[test]
    fn every_digit_survives_the_mapping() {
        let cases: Vec<(ArrayRef, DataType)> = vec![
            (
                Arc::new(Time64MicrosecondArray::from(vec![
                    Some(86_399_999_999),
                    None,
                ])),
                DataType::Int64,
            ),
            (
                Arc::new(DurationMicrosecondArray::from(vec![
                    Some(-5),
                    Some(i64::MAX),
                ])),
                DataType::Int64,
            ),
            (
                Arc::new(TimestampNanosecondArray::from(vec![Some(
                    1_700_000_000_123_456_789,
                )])),
                DataType::Int64,
            ),
        ];
        for (array, want) in cases {
            let out = to_delta(&one_column("c", array.clone())).unwrap();
            assert_eq!(out.schema().field(0).data_type(), &want);
            let got = out.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            let raw = array.to_data().buffers()[0].typed_data::<i64>()[..array.len()].to_vec();
            for (i, want) in raw.iter().enumerate() {
                assert_eq!(got.is_null(i), array.is_null(i));
                if !got.is_null(i) {
                    assert_eq!(got.value(i), *want, "{:?} row {i}", array.data_type());
                }
            }
        }
    }

    #[test]
    fn a_file_with_new_columns_widens_the_table_schema_inside_the_row_structs() {
        let row = |cols: &[(&str, DataType)]| {
            DataType::Struct(
                cols.iter()
                    .map(|(n, t)| Field::new(*n, t.clone(), true))
                    .collect(),
            )
        };
        let table = Schema::new(vec![
            Field::new("kafka_offset", DataType::Int64, false),
            Field::new("after", row(&[("id", DataType::Int32)]), true),
        ]);
        let file = Schema::new(vec![
            Field::new("kafka_offset", DataType::Int64, false),
            Field::new(
                "after",
                row(&[("id", DataType::Int32), ("note", DataType::Utf8)]),
                true,
            ),
            Field::new("avro_value", DataType::Binary, true),
        ]);
        let merged = merge_schema(&table, &file, "t");
        assert_eq!(
            merged.field_with_name("after").unwrap().data_type(),
            &row(&[("id", DataType::Int32), ("note", DataType::Utf8)])
        );
        assert!(merged.field_with_name("avro_value").unwrap().is_nullable());
        assert_eq!(
            merge_schema(&merged, &file, "t"),
            merged,
            "merging again changes nothing"
        );
        // A conflicting type keeps the table's.
        let other = Schema::new(vec![Field::new(
            "after",
            row(&[("id", DataType::Utf8)]),
            true,
        )]);
        assert_eq!(merge_schema(&merged, &other, "t"), merged);
    }

    #[test]
    fn a_column_whose_type_changed_gets_a_column_of_its_own() {
        let row = |cols: Vec<(&str, ArrayRef)>| {
            StructArray::from(
                cols.into_iter()
                    .map(|(n, a)| (Arc::new(Field::new(n, a.data_type().clone(), true)), a))
                    .collect::<Vec<_>>(),
            )
        };
        let file = one_column(
            "after",
            Arc::new(row(vec![
                ("id", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
                ("total", Arc::new(StringArray::from(vec!["12.50 EUR"]))),
            ])),
        );
        let table = Schema::new(vec![Field::new(
            "after",
            DataType::Struct(Fields::from(vec![
                Field::new("id", DataType::Int64, true),
                Field::new("total", DataType::Float64, true),
            ])),
            true,
        )]);
        let out = rename_conflicts(file, &table).unwrap();
        let after = out.column(0).as_struct();
        let names: Vec<&str> = after.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["id", "total__string"]);
        let total = after
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(total.value(0), "12.50 EUR");
        // The merged table then has both, and a file that fits is left alone.
        let merged = merge_schema(&table, &out.schema(), "t");
        let again = rename_conflicts(out.clone(), &merged).unwrap();
        assert_eq!(again.schema(), out.schema());
    }

    #[test]
    fn a_column_without_values_takes_the_tables_type() {
        // A schemaless delete: `before` has the key and nulls, which JSON inference types as text.
        let before = StructArray::from(vec![
            (
                Arc::new(Field::new("id", DataType::Int64, true)),
                Arc::new(Int64Array::from(vec![7])) as ArrayRef,
            ),
            (
                Arc::new(Field::new("total", DataType::Utf8, true)),
                Arc::new(StringArray::from(vec![None::<&str>])) as ArrayRef,
            ),
        ]);
        let table = Schema::new(vec![Field::new(
            "before",
            DataType::Struct(Fields::from(vec![
                Field::new("id", DataType::Int64, true),
                Field::new("total", DataType::Float64, true),
            ])),
            true,
        )]);
        let out = rename_conflicts(one_column("before", Arc::new(before)), &table).unwrap();
        assert_eq!(
            out.schema().as_ref(),
            &table,
            "the table's shape, no total__string"
        );
        assert!(out.column(0).as_struct().column(1).is_null(0));
        assert_eq!(
            out.column(0)
                .as_struct()
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0),
            7
        );
    }

    #[test]
    fn millisecond_timestamps_widen_and_infinity_stays_infinite() {
        let ms = TimestampMillisecondArray::from(vec![
            Some(1_700_000_000_123),
            Some(i64::MAX),
            Some(-i64::MAX),
            None,
        ])
        .with_timezone("UTC");
        let out = to_delta(&one_column("t", Arc::new(ms))).unwrap();
        assert_eq!(
            out.schema().field(0).data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        let us = out
            .column(0)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(us.value(0), 1_700_000_000_123_000);
        assert_eq!(us.value(1), i64::MAX);
        assert_eq!(us.value(2), -i64::MAX);
        assert!(us.is_null(3));
    }

    #[test]
    fn wide_decimals_become_their_exact_text_inside_structs_and_lists() {
        let big = i256::from_string("12345678901234567890123456789012345678901234").unwrap();
        let dec: ArrayRef = Arc::new(
            Decimal256Array::from(vec![Some(big), None])
                .with_precision_and_scale(50, 4)
                .unwrap(),
        );
        let row = StructArray::from(vec![(
            Arc::new(Field::new("d", dec.data_type().clone(), true)),
            dec,
        )]);
        let out = to_delta(&one_column("after", Arc::new(row))).unwrap();
        let after = out.column(0).as_struct();
        let d = after
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(d.value(0), "1234567890123456789012345678901234567890.1234");
        assert!(d.is_null(1));
    }
}
