//! Values converted to the type of an existing target column.
//!
//! Schemaless records (the seeds' settings) carry dates, times and timestamps as epoch numbers,
//! decimals as doubles, strings or base64, and JSON documents as strings. When the column they
//! land in already has a real type (an analytics table, a mirror created by the user or
//! declared in `state.column_types`), the value is converted to it here, the same way for
//! mappings and mirrors.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use crate::config::{EpochUnit, TimePrecisionMode};
use crate::envelope::value::{decimal_string, micros_to_naive_string, UNAVAILABLE_VALUE};

/// What a target column holds, as far as conversions care (from the catalog).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    TimestampTz,
    Timestamp,
    Date,
    Time,
    Numeric { scale: Option<i32> },
    Integer,
    Float,
    Text,
    Json,
    Interval,
    Other,
}

impl Kind {
    pub fn of(typname: &str, formatted: &str) -> Kind {
        match typname {
            "timestamptz" => Kind::TimestampTz,
            "timestamp" => Kind::Timestamp,
            "date" => Kind::Date,
            "time" => Kind::Time,
            "numeric" => Kind::Numeric {
                scale: formatted
                    .strip_prefix("numeric(")
                    .and_then(|r| r.split_once(',')?.1.strip_suffix(')')?.parse().ok()),
            },
            "int2" | "int4" | "int8" => Kind::Integer,
            "float4" | "float8" => Kind::Float,
            "text" | "varchar" | "bpchar" | "name" => Kind::Text,
            "json" | "jsonb" => Kind::Json,
            "interval" => Kind::Interval,
            _ => Kind::Other,
        }
    }

    pub fn temporal(self) -> bool {
        matches!(self, Kind::TimestampTz | Kind::Timestamp | Kind::Date)
    }

    pub fn numeric(self) -> bool {
        matches!(self, Kind::Numeric { .. } | Kind::Integer | Kind::Float)
    }
}

/// How a mirror column converts schemaless values: its kind, and for temporal columns the
/// unit of the epoch numbers Debezium sends for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnCoercion {
    pub kind: Kind,
    pub unit: EpochUnit,
}

impl ColumnCoercion {
    /// For a column of catalog type `typname` (`format_type` text `formatted`), under the
    /// connector's `time.precision.mode`. None when values need no conversion.
    pub fn of(typname: &str, formatted: &str, mode: TimePrecisionMode) -> Option<Self> {
        let kind = Kind::of(typname, formatted);
        // timestamp(3), time(0..3): Debezium's adaptive modes send milliseconds for these.
        let precision = formatted
            .split_once('(')
            .and_then(|(_, r)| r.split_once(')'))
            .and_then(|(p, _)| p.parse::<u8>().ok());
        let millis = precision.is_some_and(|p| p <= 3);
        let unit = match (kind, mode) {
            (_, TimePrecisionMode::Connect) => EpochUnit::Ms,
            (Kind::Time, TimePrecisionMode::AdaptiveTimeMicroseconds) => EpochUnit::Us,
            _ if millis => EpochUnit::Ms,
            _ => EpochUnit::Us,
        };
        match kind {
            Kind::TimestampTz
            | Kind::Timestamp
            | Kind::Date
            | Kind::Time
            | Kind::Numeric { .. }
            | Kind::Json
            | Kind::Interval => Some(Self { kind, unit }),
            _ => None,
        }
    }

    /// One schemaless value as this column's type; None when it stays as it is.
    pub fn convert(&self, v: &Value) -> Result<Option<Value>, String> {
        if v.is_null() || v.as_str() == Some(UNAVAILABLE_VALUE) {
            return Ok(None);
        }
        Ok(Some(match self.kind {
            Kind::Date if v.is_i64() => epoch_days(v.as_i64().expect("checked"))?,
            Kind::TimestampTz | Kind::Timestamp | Kind::Time if v.is_number() => {
                epoch(v, self.unit, self.kind)?
            }
            Kind::Numeric { scale } if v.is_string() => match decimal(v, scale)? {
                same if &same == v => return Ok(None),
                converted => converted,
            },
            // MicroDuration: microseconds.
            Kind::Interval if v.is_i64() => {
                Value::String(format!("{} microseconds", v.as_i64().expect("checked")))
            }
            // io.debezium.data.Json without a schema: a string holding the document.
            Kind::Json => {
                let Value::String(s) = v else { return Ok(None) };
                if let Some(depth) = crate::envelope::json::exceeds_depth(
                    s.as_bytes(),
                    crate::envelope::json::MAX_DEPTH,
                ) {
                    return Err(crate::envelope::json::too_deep_reason(
                        "the JSON document",
                        depth,
                    ));
                }
                match crate::envelope::json::from_str::<Value>(s) {
                    Ok(doc) => doc,
                    Err(_) => return Ok(None),
                }
            }
            _ => return Ok(None),
        }))
    }
}

/// Debezium's `Date`: days since the epoch.
pub fn epoch_days(days: i64) -> Result<Value, String> {
    NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|d| d.checked_add_signed(chrono::Duration::try_days(days)?))
        .map(|d| Value::String(d.to_string()))
        .ok_or_else(|| format!("{days} days is outside the date range"))
}

pub fn numeric_scale(kind: Kind) -> Option<i32> {
    match kind {
        Kind::Numeric { scale } => scale,
        _ => None,
    }
}

/// An epoch number (in `unit`) as the column's type; strings are already timestamps.
pub fn epoch(v: &Value, unit: EpochUnit, kind: Kind) -> Result<Value, String> {
    if v.is_string() {
        return Ok(v.clone());
    }
    let n = v
        .as_i64()
        .or_else(|| v.as_f64().map(|f| f.trunc() as i64))
        .ok_or_else(|| format!("expected an epoch number, got {v}"))?;
    let micros = match unit {
        EpochUnit::Ms => n
            .checked_mul(1000)
            .ok_or_else(|| format!("{n} ms is out of range"))?,
        EpochUnit::Us => n,
    };
    epoch_to(micros, kind)
}

pub fn epoch_to(micros: i64, kind: Kind) -> Result<Value, String> {
    let out_of_range = || format!("{micros} µs since the epoch is outside the timestamp range");
    Ok(Value::String(match kind {
        Kind::Timestamp => micros_to_naive_string(micros).map_err(|e| e.to_string())?,
        Kind::Date => DateTime::<Utc>::from_timestamp_micros(micros)
            .ok_or_else(out_of_range)?
            .date_naive()
            .to_string(),
        Kind::Time => {
            let day = 86_400_000_000i64;
            let t = micros.rem_euclid(day);
            format!(
                "{:02}:{:02}:{:02}.{:06}",
                t / 3_600_000_000,
                t / 60_000_000 % 60,
                t / 1_000_000 % 60,
                t % 1_000_000
            )
        }
        _ => DateTime::<Utc>::from_timestamp_micros(micros)
            .ok_or_else(out_of_range)?
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    }))
}

/// A Debezium decimal as a number: doubles and decimal strings pass, base64 unscaled bytes
/// (precise mode without a schema) need the scale, `{scale, value}` carries its own.
pub fn decimal(v: &Value, scale: Option<i32>) -> Result<Value, String> {
    match v {
        Value::Number(_) => Ok(v.clone()),
        // decimal.handling.mode=string spells numeric's special values as Java enum names.
        Value::String(s) if s == "NAN" => Ok(Value::String("NaN".into())),
        Value::String(s) if s == "POSITIVE_INFINITY" => Ok(Value::String("Infinity".into())),
        Value::String(s) if s == "NEGATIVE_INFINITY" => Ok(Value::String("-Infinity".into())),
        Value::String(s) if is_decimal_literal(s) => Ok(v.clone()),
        Value::String(s) => {
            let scale = scale.ok_or_else(|| {
                format!("{s:?} is a binary decimal; give its scale (scale = N, or a numeric(p,s) column)")
            })?;
            decimal_string(s, scale)
                .map(Value::String)
                .map_err(|e| e.to_string())
        }
        Value::Object(o) => match (o.get("scale").and_then(Value::as_i64), o.get("value")) {
            (Some(scale), Some(Value::String(b64))) => decimal_string(b64, scale as i32)
                .map(Value::String)
                .map_err(|e| e.to_string()),
            _ => Err(format!("{v} is not a Debezium decimal")),
        },
        other => Err(format!("{other} is not a decimal")),
    }
}

pub fn is_decimal_literal(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    !(int.is_empty() && frac.is_empty())
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        || matches!(s, "NaN" | "Infinity")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_columns_convert_schemaless_values_by_their_type() {
        use TimePrecisionMode::*;
        let tz = ColumnCoercion::of("timestamptz", "timestamp with time zone", Connect).unwrap();
        assert_eq!(
            tz.convert(&Value::from(1_709_375_445_123i64))
                .unwrap()
                .unwrap(),
            "2024-03-02T10:30:45.123000Z"
        );
        let micros =
            ColumnCoercion::of("timestamp", "timestamp without time zone", Adaptive).unwrap();
        assert_eq!(
            micros
                .convert(&Value::from(1_709_375_445_123_456i64))
                .unwrap()
                .unwrap(),
            "2024-03-02T10:30:45.123456"
        );
        let millis =
            ColumnCoercion::of("timestamp", "timestamp(3) without time zone", Adaptive).unwrap();
        assert_eq!(millis.unit, EpochUnit::Ms);
        let time = ColumnCoercion::of(
            "time",
            "time(3) without time zone",
            AdaptiveTimeMicroseconds,
        )
        .unwrap();
        assert_eq!(time.unit, EpochUnit::Us);
        let date = ColumnCoercion::of("date", "date", Connect).unwrap();
        assert_eq!(
            date.convert(&Value::from(19_784)).unwrap().unwrap(),
            "2024-03-02"
        );
        let numeric = ColumnCoercion::of("numeric", "numeric(10,2)", Connect).unwrap();
        assert_eq!(numeric.convert(&Value::from("12.50")).unwrap(), None);
        assert_eq!(
            numeric.convert(&Value::from("MDk=")).unwrap().unwrap(),
            "123.45"
        );
        let json = ColumnCoercion::of("jsonb", "jsonb", Connect).unwrap();
        assert_eq!(
            json.convert(&Value::from(r#"{"a":[1]}"#)).unwrap(),
            Some(serde_json::json!({"a": [1]}))
        );
        let interval = ColumnCoercion::of("interval", "interval", Connect).unwrap();
        assert_eq!(
            interval.convert(&Value::from(90)).unwrap().unwrap(),
            "90 microseconds"
        );
        assert_eq!(json.convert(&serde_json::json!({"a": 1})).unwrap(), None);
        assert!(ColumnCoercion::of("text", "text", Connect).is_none());
        assert!(ColumnCoercion::of("int8", "bigint", Connect).is_none());
    }
}
