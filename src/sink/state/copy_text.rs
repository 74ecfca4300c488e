//! Values as PostgreSQL's COPY text format, for the typed staging table: each column's text is
//! what `jsonb_populate_record` would have handed the column type's input function, so staging
//! typed columns reads the same values the jsonb staging did.

use serde_json::Value;

/// How a staged value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ValueText {
    /// A scalar column: a JSON string's own text, any other value as its JSON text (numbers
    /// without exponents, as PostgreSQL's numeric prints them).
    Plain,
    /// A json, jsonb, array or composite column: the value's JSON text.
    Json,
}

/// SQL NULL in COPY text.
pub(super) const NULL: &[u8] = b"\\N";

/// Appends `v` as one COPY text field (NULL for JSON null).
pub(super) fn push_value(out: &mut Vec<u8>, v: &Value, how: ValueText) {
    match (v, how) {
        (Value::Null, _) => out.extend_from_slice(NULL),
        (Value::String(s), ValueText::Plain) => push_escaped(out, s),
        (Value::Number(n), ValueText::Plain) => push_escaped(out, &plain_number(&n.to_string())),
        (Value::Bool(b), ValueText::Plain) => {
            out.extend_from_slice(if *b { b"true" } else { b"false" })
        }
        (other, _) => {
            let json = serde_json::to_string(other).expect("a JSON value always serialises");
            push_escaped(out, &json);
        }
    }
}

/// Appends text escaped for COPY's text format: backslash, newline, carriage return and tab
/// are the characters that would otherwise end or split the field.
pub(super) fn push_escaped(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// A JSON number's text without an exponent, the way jsonb (numeric) prints it: `1e3` is
/// `1000`, `1.50e1` is `15.0`, `1.5e-7` is `0.00000015`. Integer columns accept the first,
/// where their input function would refuse `1e3`. Text without an exponent is returned as is.
pub(super) fn plain_number(text: &str) -> std::borrow::Cow<'_, str> {
    let Some(e) = text.find(['e', 'E']) else {
        return text.into();
    };
    let Ok(exponent) = text[e + 1..].parse::<i64>() else {
        return text.into();
    };
    let mantissa = &text[..e];
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    // The position of the decimal point within `digits`, after the shift.
    let point = int.len() as i64 + exponent;
    let (mut int_part, frac_part) = if point <= 0 {
        (
            "0".to_string(),
            format!("{}{digits}", "0".repeat((-point) as usize)),
        )
    } else if point as usize >= digits.len() {
        (
            format!("{digits}{}", "0".repeat(point as usize - digits.len())),
            String::new(),
        )
    } else {
        (
            digits[..point as usize].to_string(),
            digits[point as usize..].to_string(),
        )
    };
    let trimmed = int_part.trim_start_matches('0');
    int_part = if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    };
    if frac_part.is_empty() {
        format!("{sign}{int_part}").into()
    } else {
        format!("{sign}{int_part}.{frac_part}").into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(v: Value, how: ValueText) -> String {
        let mut out = Vec::new();
        push_value(&mut out, &v, how);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_lose_their_exponent_as_numeric_prints_them() {
        for (input, want) in [
            ("1e3", "1000"),
            ("1E+3", "1000"),
            ("1.50e1", "15.0"),
            ("1.5e-7", "0.00000015"),
            ("-2.5e2", "-250"),
            ("0.5e1", "5"),
            ("123.456", "123.456"),
            ("-7", "-7"),
            ("12345678901234567890123", "12345678901234567890123"),
        ] {
            assert_eq!(plain_number(input), want, "{input}");
        }
    }

    #[test]
    fn fields_are_escaped_for_copy_text() {
        assert_eq!(
            text(json!("a\tb\nc\\d\re"), ValueText::Plain),
            "a\\tb\\nc\\\\d\\re"
        );
        assert_eq!(text(json!("\\x0102"), ValueText::Plain), "\\\\x0102");
        assert_eq!(text(Value::Null, ValueText::Plain), "\\N");
        assert_eq!(text(Value::Null, ValueText::Json), "\\N");
        // The string "\N" is not NULL.
        assert_eq!(text(json!("\\N"), ValueText::Plain), "\\\\N");
    }

    #[test]
    fn json_columns_take_json_text_and_scalars_take_their_own_text() {
        assert_eq!(text(json!("abc"), ValueText::Json), "\"abc\"");
        assert_eq!(
            text(json!({"k": "a\tb"}), ValueText::Json),
            "{\"k\":\"a\\\\tb\"}"
        );
        assert_eq!(text(json!([1, null]), ValueText::Json), "[1,null]");
        assert_eq!(text(json!(true), ValueText::Plain), "true");
        assert_eq!(text(json!("abc"), ValueText::Plain), "abc");
        assert_eq!(text(json!({"k": 1}), ValueText::Plain), "{\"k\":1}");
    }
}
