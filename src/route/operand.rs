//! Typed values for filter conditions: a change's field as its column type says, a literal as
//! YAML wrote it, and the comparisons between them. Decimals compare exactly, times compare as
//! instants, and text never compares as a number by accident.

use std::borrow::Cow;
use std::cmp::Ordering;

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use serde_json::Value;

use crate::envelope::ColumnType;

/// One side of a comparison, taken from a change.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand<'a> {
    Null,
    Bool(bool),
    /// A number as exact decimal text (every digit the source sent).
    Number(Cow<'a, str>),
    Text(Cow<'a, str>),
    /// Microseconds since the epoch, UTC (a date is its midnight).
    Time(i64),
    /// A value no operator but `isNull`/`isNotNull` applies to (an object, array, bytes, NaN).
    Other(&'static str),
    /// A TOAST placeholder: unchanged, but not in this change. Every test of it is unknown.
    Unavailable,
}

impl Operand<'_> {
    /// What the operand is, for error messages (never its value: row values stay out of logs).
    pub fn kind(&self) -> &'static str {
        match self {
            Operand::Null => "null",
            Operand::Bool(_) => "boolean",
            Operand::Number(_) => "number",
            Operand::Text(_) => "text",
            Operand::Time(_) => "time",
            Operand::Other(kind) => kind,
            Operand::Unavailable => "unavailable (TOAST)",
        }
    }
}

/// A constant in a condition, as written in the YAML file.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Bool(bool),
    /// Exact decimal text (a YAML number, or a quoted decimal compared with a number column).
    Number(String),
    Text(String),
}

impl Literal {
    pub fn kind(&self) -> &'static str {
        match self {
            Literal::Bool(_) => "boolean",
            Literal::Number(_) => "number",
            Literal::Text(_) => "text",
        }
    }
}

/// How a column type compares: the one place that sorts the types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comparison {
    Number,
    Time,
    Bool,
    Structured,
    /// Text, uuid, time of day, interval and anything schemaless: as JSON says.
    AsJson,
}

fn comparison(ty: &ColumnType) -> Comparison {
    use ColumnType as T;
    match ty {
        T::Int16
        | T::Int32
        | T::Int64
        | T::Float32
        | T::Float64
        | T::Decimal { .. }
        | T::VariableDecimal
        | T::WideInteger
        | T::HugeInteger => Comparison::Number,
        T::Date | T::Timestamp(_) | T::TimestampTz => Comparison::Time,
        T::Boolean => Comparison::Bool,
        T::Json | T::Bytes | T::Array(_) => Comparison::Structured,
        _ => Comparison::AsJson,
    }
}

/// The operand of a column value of type `ty`, after the change's values were converted for
/// PostgreSQL (`ChangeEvent::sql_image`: decimals as decimal text, times as ISO text).
pub fn column_operand<'a>(ty: Option<&ColumnType>, v: &'a Value) -> Operand<'a> {
    if v.is_null() {
        return Operand::Null;
    }
    match ty.map_or(Comparison::AsJson, comparison) {
        Comparison::Number => match v {
            Value::Number(n) => Operand::Number(Cow::Owned(n.to_string())),
            Value::String(s) if Decimal::parse(s).is_some() => Operand::Number(Cow::Borrowed(s)),
            // NaN and the infinities are not comparable with a decimal.
            _ => Operand::Other("non-finite number"),
        },
        Comparison::Time => match v.as_str().and_then(parse_time) {
            Some(t) => Operand::Time(t),
            None => Operand::Other("time out of range"),
        },
        Comparison::Bool => v
            .as_bool()
            .map_or(Operand::Other("non-boolean"), Operand::Bool),
        Comparison::Structured => Operand::Other("structured value"),
        Comparison::AsJson => json_operand(v),
    }
}

/// The operand of a JSON value without a declared type (schemaless rows, `source` fields).
pub fn json_operand(v: &Value) -> Operand<'_> {
    match v {
        Value::Null => Operand::Null,
        Value::Bool(b) => Operand::Bool(*b),
        Value::Number(n) => Operand::Number(Cow::Owned(n.to_string())),
        Value::String(s) => Operand::Text(Cow::Borrowed(s)),
        Value::Array(_) | Value::Object(_) => Operand::Other("structured value"),
    }
}

/// Why two values cannot be compared: a definition that does not fit the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMismatch(pub String);

/// Orders `a` against the literal `b`. `Ok(None)`: `a` is null (SQL's unknown).
pub fn compare(a: &Operand, b: &Literal) -> Result<Option<Ordering>, TypeMismatch> {
    let mismatch = || {
        Err(TypeMismatch(format!(
            "cannot compare a {} value with a {} literal",
            a.kind(),
            b.kind()
        )))
    };
    match (a, b) {
        (Operand::Null, _) => Ok(None),
        (Operand::Number(x), Literal::Number(y)) => Ok(Some(decimal_cmp(x, y))),
        // A quoted decimal against a number column compares as the column's type says.
        (Operand::Number(x), Literal::Text(y)) if Decimal::parse(y).is_some() => {
            Ok(Some(decimal_cmp(x, y)))
        }
        (Operand::Text(x), Literal::Text(y)) => Ok(Some(x.as_ref().cmp(y.as_str()))),
        (Operand::Time(x), Literal::Text(y)) => match parse_time(y) {
            Some(y) => Ok(Some(x.cmp(&y))),
            None => Err(TypeMismatch(format!(
                "literal {y:?} is not a date or timestamp (YYYY-MM-DD, YYYY-MM-DD HH:MM:SS[.f], RFC 3339)"
            ))),
        },
        (Operand::Bool(x), Literal::Bool(y)) => Ok(Some(x.cmp(y))),
        _ => mismatch(),
    }
}

/// Whether an operand of this kind can be compared with the literal at all (checked when the
/// column's type is known, before any change arrives).
pub fn comparable(ty: &ColumnType, b: &Literal) -> Result<(), TypeMismatch> {
    let sample: Operand = match comparison(ty) {
        Comparison::Number => Operand::Number("0".into()),
        Comparison::Time => Operand::Time(0),
        Comparison::Bool => Operand::Bool(false),
        Comparison::Structured => Operand::Other("structured value"),
        Comparison::AsJson => Operand::Text("".into()),
    };
    compare(&sample, b).map(|_| ())
}

/// A date, a timestamp without zone (taken as UTC) or an RFC 3339 timestamp, as microseconds
/// since the epoch. `infinity`/`-infinity` are the ends of time.
pub fn parse_time(s: &str) -> Option<i64> {
    match s {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    let date = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros())
}

/// A decimal number as sign, significant digits and exponent: the value is
/// `0.d1d2d3… × 10^exponent`. Zero has no digits.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: Vec<u8>,
    exponent: i64,
}

impl Decimal {
    /// Parses `[+-]digits[.digits][(e|E)[+-]digits]`.
    fn parse(s: &str) -> Option<Decimal> {
        let (negative, rest) = match s.as_bytes().first()? {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let (mantissa, exp) = match rest.find(['e', 'E']) {
            Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
            None => (rest, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int.is_empty() && frac.is_empty()
            || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let all: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
        let leading = all.iter().take_while(|d| **d == 0).count();
        let mut digits = all[leading..].to_vec();
        while digits.last() == Some(&0) {
            digits.pop();
        }
        let exponent = if digits.is_empty() {
            0
        } else {
            int.len() as i64 - leading as i64 + exp
        };
        Some(Decimal {
            negative: negative && !digits.is_empty(),
            digits,
            exponent,
        })
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        let magnitude = |d: &Decimal| (!d.digits.is_empty(), d.exponent, d.digits.clone());
        match (self.negative, other.negative) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => cmp_magnitude(self, other, magnitude),
            (true, true) => cmp_magnitude(other, self, magnitude),
        }
    }
}

fn cmp_magnitude(
    a: &Decimal,
    b: &Decimal,
    key: impl Fn(&Decimal) -> (bool, i64, Vec<u8>),
) -> Ordering {
    match (a.digits.is_empty(), b.digits.is_empty()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => key(a).cmp(&key(b)),
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Orders two decimal texts exactly. Both must parse (checked by the callers).
fn decimal_cmp(a: &str, b: &str) -> Ordering {
    match (Decimal::parse(a), Decimal::parse(b)) {
        (Some(a), Some(b)) => a.cmp(&b),
        _ => a.cmp(b),
    }
}

/// Whether `s` is decimal text a number column can be compared with.
pub fn is_decimal(s: &str) -> bool {
    Decimal::parse(s).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::TimeUnit;

    #[test]
    fn decimals_compare_exactly_beyond_float_precision() {
        for (a, b, want) in [
            ("100.00", "100", Ordering::Equal),
            ("100.01", "100", Ordering::Greater),
            ("-0.5", "0", Ordering::Less),
            ("-0", "0", Ordering::Equal),
            ("0.000", "-0.0", Ordering::Equal),
            ("-2", "-10", Ordering::Greater),
            ("1e3", "999.999", Ordering::Greater),
            ("1.5E-3", "0.0015", Ordering::Equal),
            // Two values an f64 cannot tell apart.
            (
                "12345678901234567890.000000001",
                "12345678901234567890",
                Ordering::Greater,
            ),
            ("0.1", "0.10000000000000001", Ordering::Less),
            ("00012.3400", "12.34", Ordering::Equal),
            // 41 nines is above 10^40; 40 nines is below it.
            (
                "99999999999999999999999999999999999999999",
                "1e40",
                Ordering::Greater,
            ),
            (
                "9999999999999999999999999999999999999999",
                "1e40",
                Ordering::Less,
            ),
        ] {
            assert_eq!(decimal_cmp(a, b), want, "{a} vs {b}");
            assert_eq!(decimal_cmp(b, a), want.reverse(), "{b} vs {a}");
        }
        for bad in [
            "", ".", "1.2.3", "abc", "1e", "--1", "NaN", "Infinity", "1,5",
        ] {
            assert!(!is_decimal(bad), "{bad}");
        }
    }

    #[test]
    fn times_compare_as_instants_whatever_their_notation() {
        let at = |s: &str| parse_time(s).unwrap();
        assert_eq!(at("2026-01-01"), at("2026-01-01 00:00:00"));
        assert_eq!(at("2026-01-01T01:00:00+01:00"), at("2026-01-01T00:00:00Z"));
        assert_eq!(at("2026-01-01 00:00:00.000001") - at("2026-01-01"), 1);
        assert!(at("infinity") > at("9999-12-31"));
        assert!(parse_time("yesterday").is_none());
        let ts = Value::String("2026-03-01T10:00:00Z".into());
        let op = column_operand(Some(&ColumnType::TimestampTz), &ts);
        let lit = |s: &str| Literal::Text(s.into());
        assert_eq!(
            compare(&op, &lit("2026-03-01T11:00:00+01:00")),
            Ok(Some(Ordering::Equal))
        );
        assert_eq!(
            compare(&op, &lit("2026-03-01")),
            Ok(Some(Ordering::Greater))
        );
        assert!(compare(&op, &lit("soon")).is_err());
        let naive = Value::String("2026-03-01 10:00:00.5".into());
        let op = column_operand(Some(&ColumnType::Timestamp(TimeUnit::Micros)), &naive);
        assert_eq!(
            compare(&op, &lit("2026-03-01T10:00:00.4Z")),
            Ok(Some(Ordering::Greater))
        );
    }

    #[test]
    fn text_never_compares_as_a_number() {
        let nine = Value::String("9".into());
        let op = column_operand(Some(&ColumnType::Text), &nine);
        assert!(compare(&op, &Literal::Number("10".into())).is_err());
        // As text, "9" sorts after "10": that is what a text comparison means.
        assert_eq!(
            compare(&op, &Literal::Text("10".into())),
            Ok(Some(Ordering::Greater))
        );
        // A number column against a quoted decimal compares as numbers ...
        let n = serde_json::json!(9);
        let op = column_operand(Some(&ColumnType::Int32), &n);
        assert_eq!(
            compare(&op, &Literal::Text("10".into())),
            Ok(Some(Ordering::Less))
        );
        // ... and against a word is a mismatch.
        assert!(compare(&op, &Literal::Text("ten".into())).is_err());
        assert!(comparable(&ColumnType::Text, &Literal::Number("1".into())).is_err());
        assert!(comparable(&ColumnType::Int64, &Literal::Bool(true)).is_err());
        assert!(comparable(
            &ColumnType::TimestampTz,
            &Literal::Text("2026-01-01".into())
        )
        .is_ok());
    }

    #[test]
    fn nulls_and_values_without_order_are_told_apart() {
        let null = Value::Null;
        assert_eq!(
            compare(
                &column_operand(Some(&ColumnType::Int32), &null),
                &Literal::Number("1".into())
            ),
            Ok(None)
        );
        let nan = Value::String("NaN".into());
        let op = column_operand(Some(&ColumnType::Float64), &nan);
        assert_eq!(op.kind(), "non-finite number");
        assert!(compare(&op, &Literal::Number("1".into())).is_err());
        let decimal = Value::String("123.4500".into());
        assert_eq!(
            compare(
                &column_operand(
                    Some(&ColumnType::Decimal {
                        precision: Some(10),
                        scale: 4
                    }),
                    &decimal
                ),
                &Literal::Number("123.45".into())
            ),
            Ok(Some(Ordering::Equal))
        );
    }
}
