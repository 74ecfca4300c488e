//! Column types of a captured table, from the Connect schema when the envelope carries one and
//! inferred from JSON values otherwise. Sinks map these to PostgreSQL and Arrow types.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The logical type of one source column.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ColumnType {
    Boolean,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// Connect `Decimal`: base64 two's-complement bytes with a fixed scale (precise mode).
    Decimal {
        precision: Option<u8>,
        scale: i8,
    },
    /// Debezium `VariableScaleDecimal`: `{scale, value}` with a per-value scale.
    VariableDecimal,
    /// A schemaless JSON integer beyond 64 bits, up to 76 digits: `numeric` in the mirror,
    /// `decimal256(76, 0)` in the lake, every digit kept.
    WideInteger,
    /// A schemaless JSON integer of more than 76 digits: `numeric` in the mirror, exact text
    /// in the lake.
    HugeInteger,
    Text,
    Uuid,
    Json,
    Bytes,
    Date,
    /// Time of day, normalised to microseconds.
    Time(TimeUnit),
    /// Timestamp without time zone, epoch-based in the given unit.
    Timestamp(TimeUnit),
    /// `ZonedTimestamp`: an ISO-8601 string with offset.
    TimestampTz,
    /// `ZonedTime`: `HH:MM:SS[.f]Z`, normalised to UTC by Debezium.
    TimeTz,
    /// `MicroDuration`: microseconds, months counted as 30.4375 days by Debezium.
    Interval,
    /// A Connect array of one element type (PostgreSQL arrays).
    Array(Box<ColumnType>),
    /// Only nulls seen so far (schemaless input): the type is not known yet.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimeUnit {
    Millis,
    Micros,
    Nanos,
}

impl TimeUnit {
    /// How many of this unit make one microsecond, as a (multiply, divide) pair.
    pub fn to_micros(self, v: i64) -> i64 {
        match self {
            TimeUnit::Millis => v.saturating_mul(1000),
            TimeUnit::Micros => v,
            TimeUnit::Nanos => v.div_euclid(1000),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
}

/// The columns of `before`/`after`, in source order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct RowSchema {
    pub columns: Vec<Column>,
    /// True when the types came from a Connect schema rather than inference.
    pub declared: bool,
    /// Stable fingerprint of a declared schema ([`RowSchema::fingerprint`]), under which the
    /// raw log stores it once (`cdc_raw.cdc_row_schemas`) so that a replay gets the same types.
    #[serde(skip)]
    pub id: Option<i64>,
}

impl RowSchema {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Types inferred from one row of a schemaless envelope. Nulls give [`ColumnType::Unknown`].
    pub fn infer(row: &serde_json::Map<String, Value>) -> RowSchema {
        RowSchema {
            columns: row
                .iter()
                .map(|(name, v)| Column {
                    name: name.clone(),
                    ty: infer_type(v),
                })
                .collect(),
            declared: false,
            id: None,
        }
    }

    /// The types of a schemaless change: inferred from `after`, or `before` for deletes.
    /// The decoder and a replay from the raw log both use this, so they type alike.
    pub fn infer_change(
        before: Option<&serde_json::Map<String, Value>>,
        after: Option<&serde_json::Map<String, Value>>,
    ) -> RowSchema {
        after.or(before).map(RowSchema::infer).unwrap_or_default()
    }

    /// A fingerprint of the columns and types that does not change between builds or
    /// machines (FNV-1a over the JSON form), so the raw log can refer to a schema by it.
    pub fn fingerprint(&self) -> i64 {
        let text = serde_json::to_string(&(&self.columns, self.declared))
            .expect("a schema always serializes");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h as i64
    }

    /// Parses the Connect schema of the row struct (`after`/`before` field of the envelope
    /// schema).
    pub fn from_connect_envelope(schema: &Value) -> Option<RowSchema> {
        let fields = schema.get("fields")?.as_array()?;
        let row = fields.iter().find(|f| {
            matches!(
                f.get("field").and_then(Value::as_str),
                Some("after" | "before")
            ) && f.get("type").and_then(Value::as_str) == Some("struct")
        })?;
        let columns = row
            .get("fields")?
            .as_array()?
            .iter()
            .filter_map(|f| {
                Some(Column {
                    name: f.get("field")?.as_str()?.to_string(),
                    ty: connect_type(f),
                })
            })
            .collect();
        let mut schema = RowSchema {
            columns,
            declared: true,
            id: None,
        };
        schema.id = Some(schema.fingerprint());
        Some(schema)
    }

    /// Merges the columns of `other` into `self`: new columns are appended, unknown types
    /// are resolved, and int/float conflicts widen to float. Returns true when anything changed.
    pub fn merge(&mut self, other: &RowSchema) -> bool {
        let mut changed = false;
        for col in &other.columns {
            match self.columns.iter_mut().find(|c| c.name == col.name) {
                None => {
                    self.columns.push(col.clone());
                    changed = true;
                }
                Some(existing) => {
                    let widened = widen(&existing.ty, &col.ty);
                    if widened != existing.ty {
                        existing.ty = widened;
                        changed = true;
                    }
                }
            }
        }
        self.declared &= other.declared;
        if changed {
            self.id = None;
        }
        changed
    }
}

impl RowSchema {
    /// Whether some column of `other` has a type this schema cannot widen to (say text
    /// arriving in an integer column after a source `ALTER COLUMN … TYPE`): the lake then
    /// starts a new file rather than write those values as nulls.
    pub fn conflicts(&self, other: &RowSchema) -> bool {
        other.columns.iter().any(|col| {
            self.column(&col.name)
                .is_some_and(|mine| !widens(&mine.ty, &col.ty))
        })
    }
}

/// Whether two inferred types of one column fit one file column: equal, one still unknown,
/// or integers and floats (widened to float).
fn widens(a: &ColumnType, b: &ColumnType) -> bool {
    use ColumnType::*;
    a == b
        || matches!(
            (a, b),
            (Unknown, _)
                | (_, Unknown)
                | (Int64, Float64)
                | (Float64, Int64)
                | (Int64 | WideInteger | HugeInteger, WideInteger | HugeInteger)
                | (WideInteger | HugeInteger, Int64)
        )
}

fn widen(a: &ColumnType, b: &ColumnType) -> ColumnType {
    use ColumnType::*;
    match (a, b) {
        (x, y) if x == y => x.clone(),
        (Unknown, y) => y.clone(),
        (x, Unknown) => x.clone(),
        (Int64, Float64) | (Float64, Int64) => Float64,
        // Integers widen to the width that holds every value exactly.
        (HugeInteger, Int64 | WideInteger) | (Int64 | WideInteger, HugeInteger) => HugeInteger,
        (WideInteger, Int64) | (Int64, WideInteger) => WideInteger,
        // Irreconcilable: keep the first type; the sinks decide whether a value fits.
        (x, _) => x.clone(),
    }
}

/// The type of an integer literal that does not fit `i64` (None for a float: a fraction or an
/// exponent). serde_json keeps the literal's digits (`arbitrary_precision`).
fn integer_width(n: &serde_json::Number) -> Option<ColumnType> {
    // The number's literal as received (arbitrary_precision), without copying it.
    let text = n.as_str();
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(if digits.len() <= 76 {
        ColumnType::WideInteger
    } else {
        ColumnType::HugeInteger
    })
}

fn infer_type(v: &Value) -> ColumnType {
    match v {
        Value::Null => ColumnType::Unknown,
        Value::Bool(_) => ColumnType::Boolean,
        Value::Number(n) if n.is_i64() => ColumnType::Int64,
        Value::Number(n) => integer_width(n).unwrap_or(ColumnType::Float64),
        Value::String(_) => ColumnType::Text,
        Value::Array(_) | Value::Object(_) => ColumnType::Json,
    }
}

fn connect_type(field: &Value) -> ColumnType {
    let name = field.get("name").and_then(Value::as_str).unwrap_or("");
    let ty = field.get("type").and_then(Value::as_str).unwrap_or("");
    match name {
        "org.apache.kafka.connect.data.Decimal" => {
            let params = field.get("parameters");
            let param = |k: &str| {
                params
                    .and_then(|p| p.get(k))
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<i64>().ok())
            };
            ColumnType::Decimal {
                precision: param("connect.decimal.precision")
                    .and_then(|p| u8::try_from(p).ok())
                    .filter(|p| *p > 0 && *p <= 76),
                scale: param("scale")
                    .and_then(|s| i8::try_from(s).ok())
                    .unwrap_or(0),
            }
        }
        "io.debezium.data.VariableScaleDecimal" => ColumnType::VariableDecimal,
        "io.debezium.data.Uuid" => ColumnType::Uuid,
        "io.debezium.data.Json" => ColumnType::Json,
        "org.apache.kafka.connect.data.Date" | "io.debezium.time.Date" => ColumnType::Date,
        "org.apache.kafka.connect.data.Time" | "io.debezium.time.Time" => {
            ColumnType::Time(TimeUnit::Millis)
        }
        "io.debezium.time.MicroTime" => ColumnType::Time(TimeUnit::Micros),
        "io.debezium.time.NanoTime" => ColumnType::Time(TimeUnit::Nanos),
        "org.apache.kafka.connect.data.Timestamp" | "io.debezium.time.Timestamp" => {
            ColumnType::Timestamp(TimeUnit::Millis)
        }
        "io.debezium.time.MicroTimestamp" => ColumnType::Timestamp(TimeUnit::Micros),
        "io.debezium.time.NanoTimestamp" => ColumnType::Timestamp(TimeUnit::Nanos),
        "io.debezium.time.ZonedTimestamp" => ColumnType::TimestampTz,
        "io.debezium.time.ZonedTime" => ColumnType::TimeTz,
        "io.debezium.time.MicroDuration" => ColumnType::Interval,
        _ if ty == "array" => match field.get("items").map(connect_type) {
            // Nested arrays and arrays of structs stay JSON documents.
            Some(elem) if !matches!(elem, ColumnType::Json | ColumnType::Array(_)) => {
                ColumnType::Array(Box::new(elem))
            }
            _ => ColumnType::Json,
        },
        _ => match ty {
            "boolean" => ColumnType::Boolean,
            "int8" | "int16" => ColumnType::Int16,
            "int32" => ColumnType::Int32,
            "int64" => ColumnType::Int64,
            // JsonConverter writes "float" and "double" (its JsonSchema names); Connect's own
            // Schema.Type names are "float32" and "float64". Both mean the same types.
            "float" | "float32" => ColumnType::Float32,
            "double" | "float64" => ColumnType::Float64,
            "bytes" => ColumnType::Bytes,
            "string" => ColumnType::Text,
            "array" | "map" | "struct" => ColumnType::Json,
            other => {
                warn_unknown_type(other, field.get("field").and_then(Value::as_str));
                ColumnType::Text
            }
        },
    }
}

/// An unknown Connect type name is kept as exact text, and said once per type and column (a
/// name, never a value).
fn warn_unknown_type(ty: &str, column: Option<&str>) {
    static SEEN: std::sync::Mutex<Option<std::collections::HashSet<(String, String)>>> =
        std::sync::Mutex::new(None);
    let column = column.unwrap_or("");
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen
        .get_or_insert_with(Default::default)
        .insert((ty.to_string(), column.to_string()))
    {
        tracing::warn!(
            connect_type = ty,
            column,
            "unknown Kafka Connect type name; the column is stored as text"
        );
    }
}

/// How many distinct inferred schemas a decoder keeps for sharing. Changes of one table
/// mostly have one shape; a few dozen covers tables interleaved in a batch.
const INFERRED_SCHEMAS_KEPT: usize = 32;

/// The schemas a decoder inferred last, most recently used first, so that schemaless changes
/// of one shape share one schema: the sinks compare schemas by pointer first and then skip
/// their per-change schema merges and conflict checks (a tenth of the mirror's and the lake's
/// time when every change had a schema of its own).
#[derive(Debug, Default)]
pub struct InferredSchemas {
    recent: Vec<std::sync::Arc<RowSchema>>,
}

impl InferredSchemas {
    /// The shared schema [`RowSchema::infer_change`] gives for this change. The row is compared
    /// with the kept schemas before anything is built: the decoder calls this for every
    /// schemaless change, and nearly all of them match the schema of the change before.
    pub fn share_change(
        &mut self,
        before: Option<&serde_json::Map<String, Value>>,
        after: Option<&serde_json::Map<String, Value>>,
    ) -> std::sync::Arc<RowSchema> {
        let row = after.or(before);
        // Only infer_change's schemas are kept (never declared, no id): comparing the columns
        // is comparing the whole schema.
        let matches = |s: &RowSchema| match row {
            None => s.columns.is_empty(),
            Some(row) => {
                s.columns.len() == row.len()
                    && s.columns
                        .iter()
                        .zip(row)
                        .all(|(c, (name, v))| c.name == *name && c.ty == infer_type(v))
            }
        };
        if let Some(i) = self.recent.iter().position(|s| matches(s)) {
            // Most recently used first: the next change is most likely of the same shape.
            self.recent[..=i].rotate_right(1);
            return self.recent[0].clone();
        }
        let shared = std::sync::Arc::new(RowSchema::infer_change(before, after));
        self.recent.insert(0, shared.clone());
        self.recent.truncate(INFERRED_SCHEMAS_KEPT);
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inferred_types_that_cannot_widen_conflict() {
        let row = |v: serde_json::Value| RowSchema::infer(v.as_object().unwrap());
        let ints = row(json!({"id": 1, "v": 7, "late": null}));
        assert!(
            !ints.conflicts(&row(json!({"id": 2, "v": 7.5}))),
            "int widens to float"
        );
        assert!(!ints.conflicts(&row(json!({"id": 2, "v": null, "late": "x"}))));
        assert!(
            !ints.conflicts(&row(json!({"new": true}))),
            "new columns are added"
        );
        assert!(ints.conflicts(&row(json!({"id": 3, "v": "not a number"}))));
    }

    #[test]
    fn connect_arrays_interval_and_zoned_time() {
        let field = |f: serde_json::Value| connect_type(&f);
        assert_eq!(
            field(json!({"type":"array","items":{"type":"int32","optional":true},"field":"a"})),
            ColumnType::Array(Box::new(ColumnType::Int32))
        );
        assert_eq!(
            field(
                json!({"type":"array","items":{"type":"array","items":{"type":"int32"}},"field":"a"})
            ),
            ColumnType::Json,
            "nested arrays stay documents"
        );
        assert_eq!(
            field(json!({"type":"int64","name":"io.debezium.time.MicroDuration","field":"a"})),
            ColumnType::Interval
        );
        assert_eq!(
            field(json!({"type":"string","name":"io.debezium.time.ZonedTime","field":"a"})),
            ColumnType::TimeTz
        );
    }

    #[test]
    fn connect_types_map_to_logical_types() {
        let cases = [
            (json!({"type":"int32","field":"a"}), ColumnType::Int32),
            (
                json!({"type":"int64","name":"io.debezium.time.MicroTimestamp","field":"a"}),
                ColumnType::Timestamp(TimeUnit::Micros),
            ),
            (
                json!({"type":"int64","name":"org.apache.kafka.connect.data.Timestamp","field":"a"}),
                ColumnType::Timestamp(TimeUnit::Millis),
            ),
            (
                json!({"type":"string","name":"io.debezium.time.ZonedTimestamp","field":"a"}),
                ColumnType::TimestampTz,
            ),
            (
                json!({"type":"string","name":"io.debezium.data.Uuid","field":"a"}),
                ColumnType::Uuid,
            ),
            (
                json!({"type":"int32","name":"io.debezium.time.Date","field":"a"}),
                ColumnType::Date,
            ),
            (
                json!({"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2","connect.decimal.precision":"10"},"field":"a"}),
                ColumnType::Decimal {
                    precision: Some(10),
                    scale: 2,
                },
            ),
            (json!({"type":"bytes","field":"a"}), ColumnType::Bytes),
            (json!({"type":"float","field":"a"}), ColumnType::Float32),
            (json!({"type":"double","field":"a"}), ColumnType::Float64),
            (json!({"type":"float32","field":"a"}), ColumnType::Float32),
            (json!({"type":"float64","field":"a"}), ColumnType::Float64),
            (json!({"type":"int8","field":"a"}), ColumnType::Int16),
            (json!({"type":"boolean","field":"a"}), ColumnType::Boolean),
            (json!({"type":"string","field":"a"}), ColumnType::Text),
        ];
        for (field, want) in cases {
            assert_eq!(connect_type(&field), want, "{field}");
        }
    }

    #[test]
    fn merge_resolves_unknown_and_widens_numbers() {
        let mut a = RowSchema::infer(json!({"x": null, "n": 1}).as_object().unwrap());
        let b = RowSchema::infer(
            json!({"x": "s", "n": 1.5, "new": true})
                .as_object()
                .unwrap(),
        );
        assert!(a.merge(&b));
        assert_eq!(a.column("x").unwrap().ty, ColumnType::Text);
        assert_eq!(a.column("n").unwrap().ty, ColumnType::Float64);
        assert_eq!(a.column("new").unwrap().ty, ColumnType::Boolean);
        assert!(
            !a.merge(&b),
            "merging the same schema twice changes nothing"
        );
    }

    /// Changes of one shape share one schema; another type or another shape gets its own,
    /// and a shape seen before is found again among the last ones.
    #[test]
    fn inferred_schemas_of_one_shape_are_shared() {
        let mut shared = InferredSchemas::default();
        let mut share = |v: serde_json::Value| shared.share_change(None, v.as_object());
        let a = share(serde_json::json!({"id": 1, "v": "x"}));
        let b = share(serde_json::json!({"id": 2, "v": "y"}));
        let other_type = share(serde_json::json!({"id": 3, "v": 1.5}));
        let other_shape = share(serde_json::json!({"id": 4}));
        let again = share(serde_json::json!({"id": 5, "v": "z"}));
        assert!(std::sync::Arc::ptr_eq(&a, &b) && std::sync::Arc::ptr_eq(&a, &again));
        assert!(!std::sync::Arc::ptr_eq(&a, &other_type) && *a != *other_type);
        assert!(!std::sync::Arc::ptr_eq(&a, &other_shape) && *a != *other_shape);
    }

    /// Matching a change against the kept schemas gives exactly the schema inference builds,
    /// shared between changes of one shape, for every kind of row.
    #[test]
    fn a_change_gets_the_schema_inference_would_build() {
        let rows = [
            serde_json::json!({"id": 1, "v": "x", "n": 1.5}),
            serde_json::json!({"id": 2, "v": "y", "n": 2.5}),
            serde_json::json!({"v": "y", "id": 2, "n": 2.5}),
            serde_json::json!({"id": 3, "v": null, "n": 2}),
            serde_json::from_str(r#"{"id": 4, "v": [1], "n": 18446744073709551616}"#).unwrap(),
            serde_json::json!({"id": 5, "v": {"a": 1}, "n": true}),
            serde_json::json!({}),
        ];
        let mut shared = InferredSchemas::default();
        let mut seen = Vec::new();
        for round in 0..2 {
            for (i, row) in rows.iter().enumerate() {
                let row = row.as_object().unwrap();
                let as_after = shared.share_change(None, Some(row));
                assert_eq!(
                    *as_after,
                    RowSchema::infer_change(None, Some(row)),
                    "row {i}"
                );
                let as_before = shared.share_change(Some(row), None);
                assert!(std::sync::Arc::ptr_eq(&as_after, &as_before), "row {i}");
                if round == 0 {
                    seen.push(as_after);
                } else {
                    assert!(
                        std::sync::Arc::ptr_eq(&as_after, &seen[i]),
                        "row {i} shared"
                    );
                }
            }
        }
        assert!(
            std::sync::Arc::ptr_eq(&seen[0], &seen[1]),
            "one shape, one schema"
        );
        assert!(
            *seen[1] != *seen[2],
            "another column order is another schema"
        );
        let none = shared.share_change(None, None);
        assert_eq!(*none, RowSchema::default());
    }
}
