//! Converts Debezium's wire values into their logical values, once per column type.
//!
//! The PostgreSQL sinks receive "SQL JSON": each value in a form PostgreSQL parses for the
//! column's type (decimals as exact decimal strings, timestamps as ISO-8601, bytea as `\x` hex).
//! The lake asks for the same logical values as Arrow-native numbers.

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, NaiveTime, TimeDelta};
use serde_json::Value;

use super::schema::ColumnType;

/// Debezium's placeholder for a TOASTed column that did not change in this event.
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ValueError {
    #[error("expected {expected} for a {ty:?} column, got {got}")]
    Shape {
        ty: ColumnType,
        expected: &'static str,
        got: String,
    },
    #[error("decimal value is not valid base64")]
    Base64,
    #[error("decimal with {0} bytes does not fit 128 bits")]
    DecimalTooWide(usize),
    #[error("temporal value {0} is out of range")]
    OutOfRange(i64),
    #[error("the JSON document holds \\u0000, which jsonb cannot store (the raw log's envelope and the lake keep it)")]
    JsonbNul,
    #[error("{}", super::json::too_deep_reason("the JSON document", *.0))]
    TooDeep(usize),
}

fn shape(ty: &ColumnType, expected: &'static str, v: &Value) -> ValueError {
    let mut got = v.to_string();
    got.truncate(40);
    ValueError::Shape {
        ty: ty.clone(),
        expected,
        got,
    }
}

/// Decodes Connect's big-endian two's-complement decimal bytes (up to 128 bits; wider values
/// take [`decimal_string`]).
pub fn decimal_unscaled(b64: &str) -> Result<i128, ValueError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| ValueError::Base64)?;
    unscaled_i128(&bytes)
}

fn unscaled_i128(bytes: &[u8]) -> Result<i128, ValueError> {
    sign_extend::<16>(bytes)
        .map(i128::from_be_bytes)
        .ok_or(ValueError::DecimalTooWide(bytes.len()))
}

/// Big-endian two's-complement bytes widened to N bytes (None when they do not fit), for
/// 128-bit decimals here and the lake's 256-bit ones.
pub fn sign_extend<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
    if bytes.len() > N {
        return None;
    }
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut buf = if negative { [0xffu8; N] } else { [0u8; N] };
    buf[N - bytes.len()..].copy_from_slice(bytes);
    Some(buf)
}

/// The exact decimal text of Connect decimal bytes of any width: PostgreSQL `numeric` holds up
/// to 131072 digits, so a `VariableScaleDecimal` or a `numeric(60,10)` can exceed 128 bits.
pub fn decimal_string(b64: &str, scale: i32) -> Result<String, ValueError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| ValueError::Base64)?;
    if bytes.len() <= 16 {
        let unscaled = unscaled_i128(&bytes)?;
        return Ok(place_point(
            unscaled < 0,
            unscaled.unsigned_abs().to_string(),
            scale,
        ));
    }
    // Two's complement: the magnitude of a negative number is !bytes + 1.
    let negative = bytes[0] & 0x80 != 0;
    let mut magnitude = bytes;
    if negative {
        for b in magnitude.iter_mut() {
            *b = !*b;
        }
        for b in magnitude.iter_mut().rev() {
            let (sum, carry) = b.overflowing_add(1);
            *b = sum;
            if !carry {
                break;
            }
        }
    }
    Ok(place_point(negative, big_to_decimal(magnitude), scale))
}

/// Base-256 big-endian magnitude → decimal digits, by long division by 10^9.
fn big_to_decimal(mut n: Vec<u8>) -> String {
    let mut chunks: Vec<u32> = Vec::new();
    while n.iter().any(|&b| b != 0) {
        let mut rem: u64 = 0;
        for b in n.iter_mut() {
            let cur = (rem << 8) | u64::from(*b);
            *b = (cur / 1_000_000_000) as u8;
            rem = cur % 1_000_000_000;
        }
        chunks.push(rem as u32);
    }
    let Some((last, rest)) = chunks.split_last() else {
        return "0".into();
    };
    let mut s = last.to_string();
    for c in rest.iter().rev() {
        s.push_str(&format!("{c:09}"));
    }
    s
}

/// Formats an unscaled decimal exactly, e.g. (1749, 2) → "17.49".
pub fn format_decimal(unscaled: i128, scale: i8) -> String {
    place_point(
        unscaled < 0,
        unscaled.unsigned_abs().to_string(),
        i32::from(scale),
    )
}

fn place_point(negative: bool, digits: String, scale: i32) -> String {
    let sign = if negative && !digits.trim_start_matches('0').is_empty() {
        "-"
    } else {
        ""
    };
    if scale <= 0 {
        let zeros = if digits == "0" { 0 } else { (-scale) as usize };
        return format!("{sign}{digits}{}", "0".repeat(zeros));
    }
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

/// Integer value of a temporal column in its wire unit.
fn as_i64(ty: &ColumnType, v: &Value) -> Result<i64, ValueError> {
    v.as_i64().ok_or_else(|| shape(ty, "an integer", v))
}

pub fn micros_to_naive_string(micros: i64) -> Result<String, ValueError> {
    let dt = DateTime::from_timestamp_micros(micros).ok_or(ValueError::OutOfRange(micros))?;
    Ok(dt.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string())
}

fn time_string(micros: i64) -> Result<String, ValueError> {
    if !(0..=MICROS_PER_DAY).contains(&micros) {
        return Err(ValueError::OutOfRange(micros));
    }
    // PostgreSQL's time type includes 24:00:00, which chrono's NaiveTime does not.
    if micros == MICROS_PER_DAY {
        return Ok("24:00:00".into());
    }
    let t = NaiveTime::MIN
        .overflowing_add_signed(TimeDelta::microseconds(micros))
        .0;
    Ok(t.format("%H:%M:%S%.6f").to_string())
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// PostgreSQL's `infinity` and `-infinity` for dates and timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Infinity {
    Positive,
    Negative,
}

impl Infinity {
    fn sql(self) -> &'static str {
        match self {
            Infinity::Positive => "infinity",
            Infinity::Negative => "-infinity",
        }
    }

    /// The lake's value for it: the extremes DuckDB reads as ±infinity (±i64::MAX; dates
    /// ±i32::MAX), in any unit.
    pub fn lake_extreme(self, ty: &ColumnType) -> i64 {
        let max = if *ty == ColumnType::Date {
            i64::from(i32::MAX)
        } else {
            i64::MAX
        };
        match self {
            Infinity::Positive => max,
            Infinity::Negative => -max,
        }
    }
}

/// Debezium's numeric encodings of PostgreSQL ±infinity (captured in
/// tests/fixtures/debezium/zoo-*.ndjson): timestamps become these microsecond values (their
/// millisecond equivalents under `Timestamp`), and dates overflow PostgreSQL's internal
/// INT32_MAX/INT32_MIN day numbers while moving their epoch from 2000 to 1970. No real
/// PostgreSQL date or timestamp has these values.
const TIMESTAMP_POS_INFINITY_MICROS: i64 = 9_223_372_036_825_200_000;
const TIMESTAMP_NEG_INFINITY_MICROS: i64 = -9_223_372_036_832_400_000;
const DATE_POS_INFINITY_DAYS: i64 = -2_147_472_692;
const DATE_NEG_INFINITY_DAYS: i64 = -2_147_472_691;

/// Whether a wire value is Debezium's encoding of ±infinity for this column type.
pub fn infinity(ty: &ColumnType, v: &Value) -> Option<Infinity> {
    match (ty, v) {
        (ColumnType::Date, Value::Number(n)) => match n.as_i64()? {
            DATE_POS_INFINITY_DAYS => Some(Infinity::Positive),
            DATE_NEG_INFINITY_DAYS => Some(Infinity::Negative),
            _ => None,
        },
        (ColumnType::Timestamp(unit), Value::Number(n)) => match unit.to_micros(n.as_i64()?) {
            TIMESTAMP_POS_INFINITY_MICROS => Some(Infinity::Positive),
            TIMESTAMP_NEG_INFINITY_MICROS => Some(Infinity::Negative),
            _ => None,
        },
        (ColumnType::TimestampTz, Value::String(s)) => match s.as_str() {
            "infinity" => Some(Infinity::Positive),
            "-infinity" => Some(Infinity::Negative),
            _ => None,
        },
        _ => None,
    }
}

/// Days since the epoch → `YYYY-MM-DD`.
fn date_string(days: i64) -> Result<String, ValueError> {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
    // try_days: TimeDelta::days panics beyond ±2^63 ms (found by tools/fuzz).
    TimeDelta::try_days(days)
        .and_then(|delta| epoch.checked_add_signed(delta))
        .map(|d| d.format("%Y-%m-%d").to_string())
        .ok_or(ValueError::OutOfRange(days))
}

/// Float columns carry NaN and ±Infinity as JSON strings (Jackson's non-numeric numbers).
pub fn float_value(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

/// Whether [`to_sql_json`] changes this value (false for plain JSON scalars of plain types).
pub fn converts(ty: &ColumnType, v: &Value) -> bool {
    match ty {
        _ if v.is_null() => false,
        ColumnType::Decimal { .. } => v.is_string(),
        ColumnType::VariableDecimal
        | ColumnType::Date
        | ColumnType::Time(_)
        | ColumnType::Timestamp(_)
        | ColumnType::Interval
        | ColumnType::Bytes => true,
        ColumnType::Json => v.is_string(),
        ColumnType::Array(elem) => v
            .as_array()
            .is_some_and(|items| items.iter().any(|i| converts(elem, i))),
        _ => false,
    }
}

/// Converts one wire value to the form PostgreSQL parses for the column type.
pub fn to_sql_json(ty: &ColumnType, v: &Value) -> Result<Value, ValueError> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    if let Some(inf) = infinity(ty, v) {
        return Ok(Value::String(inf.sql().into()));
    }
    Ok(match ty {
        ColumnType::Decimal { scale, .. } => match v {
            // decimal.handling.mode=double or string arrive as plain JSON.
            Value::Number(_) => v.clone(),
            Value::String(s) => Value::String(decimal_string(s, i32::from(*scale))?),
            _ => return Err(shape(ty, "base64 bytes", v)),
        },
        ColumnType::VariableDecimal => {
            let scale = v
                .get("scale")
                .and_then(Value::as_i64)
                .ok_or_else(|| shape(ty, "{scale, value}", v))?;
            let bytes = v
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| shape(ty, "{scale, value}", v))?;
            Value::String(decimal_string(
                bytes,
                i32::try_from(scale).map_err(|_| ValueError::OutOfRange(scale))?,
            )?)
        }
        ColumnType::Date => Value::String(date_string(as_i64(ty, v)?)?),
        ColumnType::Time(unit) => Value::String(time_string(unit.to_micros(as_i64(ty, v)?))?),
        ColumnType::Timestamp(unit) => {
            Value::String(micros_to_naive_string(unit.to_micros(as_i64(ty, v)?))?)
        }
        // MicroDuration: PostgreSQL parses "<n> microseconds" exactly.
        ColumnType::Interval => Value::String(format!("{} microseconds", as_i64(ty, v)?)),
        ColumnType::Bytes => match v {
            Value::String(s) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|_| ValueError::Base64)?;
                let mut hex = String::with_capacity(2 + bytes.len() * 2);
                hex.push_str("\\x");
                for b in bytes {
                    hex.push_str(&format!("{b:02x}"));
                }
                Value::String(hex)
            }
            _ => return Err(shape(ty, "base64 bytes", v)),
        },
        // io.debezium.data.Json arrives as a string holding JSON; store the document itself.
        ColumnType::Json => match v {
            Value::String(s) => {
                match super::json::exceeds_depth(s.as_bytes(), super::json::MAX_DEPTH) {
                    Some(depth) => return Err(ValueError::TooDeep(depth)),
                    None => match super::json::from_str::<Value>(s) {
                        Ok(doc) if holds_nul(&doc) => return Err(ValueError::JsonbNul),
                        Ok(doc) => doc,
                        Err(_) => v.clone(),
                    },
                }
            }
            _ => v.clone(),
        },
        ColumnType::Array(elem) => match v {
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| to_sql_json(elem, i))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err(shape(ty, "an array", v)),
        },
        _ => v.clone(),
    })
}

/// Whether a JSON document holds U+0000, which `jsonb` cannot store.
fn holds_nul(doc: &Value) -> bool {
    match doc {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// The value of a temporal column for the lake's Arrow columns: timestamps in microseconds
/// since the epoch, times (with time zone: in UTC) in microseconds since midnight, dates in
/// days, intervals in microseconds. ±infinity become the extremes DuckDB reads as ±infinity
/// (±i64::MAX; dates ±i32::MAX).
pub fn temporal_i64(ty: &ColumnType, v: &Value) -> Result<i64, ValueError> {
    if let Some(inf) = infinity(ty, v) {
        return Ok(inf.lake_extreme(ty));
    }
    match ty {
        ColumnType::Date | ColumnType::Interval => as_i64(ty, v),
        ColumnType::Time(unit) | ColumnType::Timestamp(unit) => Ok(unit.to_micros(as_i64(ty, v)?)),
        ColumnType::TimestampTz => {
            let s = v
                .as_str()
                .ok_or_else(|| shape(ty, "an ISO-8601 string", v))?;
            DateTime::parse_from_rfc3339(s)
                .map(|d| d.timestamp_micros())
                .map_err(|_| shape(ty, "an ISO-8601 string", v))
        }
        ColumnType::TimeTz => {
            // ZonedTime: "HH:MM:SS[.ffffff]Z", always in UTC.
            let s = v.as_str().ok_or_else(|| shape(ty, "HH:MM:SS[.f]Z", v))?;
            let t = s
                .strip_suffix('Z')
                .and_then(|t| NaiveTime::parse_from_str(t, "%H:%M:%S%.f").ok())
                .ok_or_else(|| shape(ty, "HH:MM:SS[.f]Z", v))?;
            Ok((t - NaiveTime::MIN)
                .num_microseconds()
                .expect("a time of day fits"))
        }
        _ => Err(shape(ty, "a temporal value", v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::schema::TimeUnit;
    use serde_json::json;

    #[test]
    fn absurd_dates_are_out_of_range_not_a_panic() {
        // Found by tools/fuzz: a Date of i64::MAX days used to panic inside chrono.
        assert_eq!(date_string(0).unwrap(), "1970-01-01");
        assert_eq!(date_string(-1).unwrap(), "1969-12-31");
        for days in [i64::MAX, i64::MIN, 1 << 40] {
            assert!(matches!(date_string(days), Err(ValueError::OutOfRange(_))));
        }
    }

    #[test]
    fn decimals_decode_exactly() {
        // Values from the defaults sample: Dune at 19.99 then 17.49, Emma at 9.50.
        let cases = [
            ("B88=", 2, "19.99"),
            ("BtU=", 2, "17.49"),
            ("A7Y=", 2, "9.50"),
            ("/w==", 0, "-1"),
            ("/4M=", 2, "-1.25"),
            ("", 2, "0.00"),
            ("AQ==", -2, "100"),
        ];
        for (b64, scale, want) in cases {
            assert_eq!(
                format_decimal(decimal_unscaled(b64).unwrap(), scale),
                want,
                "{b64}"
            );
        }
        assert_eq!(decimal_unscaled("!!"), Err(ValueError::Base64));
    }

    #[test]
    fn wire_values_become_sql_text() {
        let dec = ColumnType::Decimal {
            precision: Some(10),
            scale: 2,
        };
        let cases = [
            (dec.clone(), json!("D54="), json!("39.98")),
            (dec, json!(9.5), json!(9.5)),
            (
                ColumnType::Timestamp(TimeUnit::Micros),
                json!(1709375445123456i64),
                json!("2024-03-02T10:30:45.123456"),
            ),
            (
                ColumnType::Timestamp(TimeUnit::Millis),
                json!(1709155056789i64),
                json!("2024-02-28T21:17:36.789000"),
            ),
            (ColumnType::Date, json!(19784), json!("2024-03-02")),
            (
                ColumnType::Time(TimeUnit::Micros),
                json!(37845123456i64),
                json!("10:30:45.123456"),
            ),
            (ColumnType::Bytes, json!("AQL/"), json!("\\x0102ff")),
            (ColumnType::Json, json!("{\"a\":1}"), json!({"a": 1})),
            (ColumnType::Text, json!("x"), json!("x")),
            (ColumnType::Int32, Value::Null, Value::Null),
        ];
        for (ty, wire, want) in cases {
            assert_eq!(to_sql_json(&ty, &wire).unwrap(), want, "{ty:?} {wire}");
        }
        assert!(to_sql_json(&ColumnType::Date, &json!("x")).is_err());
    }

    #[test]
    fn wide_decimals_infinities_and_midnight_are_exact() {
        // numeric(60,10) from the type zoo capture (more than 128 bits).
        assert_eq!(
            decimal_string("E6r1BOS8HmIXP4ekN4w3tJyMz/GWjATVFQ==", 10).unwrap(),
            "12345678901234567890123456789012345678901234567890.0123456789"
        );
        assert_eq!(
            decimal_string("7FUK+xtD4Z3owHhbyHPIS2NzMA5pc/sq6w==", 10).unwrap(),
            "-12345678901234567890123456789012345678901234567890.0123456789"
        );
        assert_eq!(decimal_string("AA==", 0).unwrap(), "0");
        let ts = ColumnType::Timestamp(TimeUnit::Micros);
        assert_eq!(
            to_sql_json(&ts, &json!(9_223_372_036_825_200_000i64)).unwrap(),
            json!("infinity")
        );
        assert_eq!(
            to_sql_json(
                &ColumnType::Timestamp(TimeUnit::Millis),
                &json!(-9_223_372_036_832_400i64)
            )
            .unwrap(),
            json!("-infinity")
        );
        assert_eq!(
            to_sql_json(&ColumnType::Date, &json!(-2_147_472_692i64)).unwrap(),
            json!("infinity")
        );
        assert_eq!(
            temporal_i64(&ColumnType::Date, &json!(-2_147_472_691i64)).unwrap(),
            -i64::from(i32::MAX)
        );
        assert_eq!(
            to_sql_json(
                &ColumnType::Time(TimeUnit::Micros),
                &json!(86_400_000_000i64)
            )
            .unwrap(),
            json!("24:00:00")
        );
        assert_eq!(
            temporal_i64(&ColumnType::TimeTz, &json!("05:00:45.123456Z")).unwrap(),
            18_045_123_456
        );
        assert_eq!(
            to_sql_json(&ColumnType::Json, &json!(r#"{"nul": "\u0000"}"#)),
            Err(ValueError::JsonbNul)
        );
        assert!(float_value(&json!("NaN")).unwrap().is_nan());
    }

    #[test]
    fn zoned_timestamps_parse_to_micros() {
        let v = json!("2024-02-28T21:17:36.789000Z");
        assert_eq!(
            temporal_i64(&ColumnType::TimestampTz, &v).unwrap(),
            1709155056789000
        );
    }
}
