//! SQL identifiers and object-store path segments derived from message content. Everything that
//! reaches SQL text or a path goes through here: validated, then quoted.

/// A plain identifier: ASCII letters, digits and `_`, not starting with a digit, at most 63
/// bytes (PostgreSQL's limit).
pub fn is_valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Quotes any identifier for PostgreSQL: `"` doubles, and the result is always quoted, so names
/// like `order` or `MixedCase` keep their meaning. Rejects what PostgreSQL cannot name.
pub fn quote_ident(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 63 || s.contains('\0') {
        return Err(format!("{s:?} cannot be a PostgreSQL identifier"));
    }
    Ok(format!("\"{}\"", s.replace('"', "\"\"")))
}

/// A path segment for the lake: letters, digits and `._-=+`, no `..`, so that content can never
/// escape its directory or collide with another key.
pub fn is_safe_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '=' | '+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated_and_quoted() {
        for ok in ["books", "order_items", "_x1"] {
            assert!(is_valid_ident(ok), "{ok}");
        }
        for bad in ["", "1abc", "a-b", "a;drop", "é", &"x".repeat(64)] {
            assert!(!is_valid_ident(bad), "{bad}");
        }
        assert_eq!(quote_ident("order").unwrap(), "\"order\"");
        assert_eq!(quote_ident("we\"ird").unwrap(), "\"we\"\"ird\"");
        assert!(quote_ident("").is_err());
        assert!(quote_ident("a\0b").is_err());
    }

    #[test]
    fn path_segments_cannot_escape() {
        for ok in [
            "public.books",
            "ecom-connector.public.books+0+12",
            "date=2024-03-02",
        ] {
            assert!(is_safe_path_segment(ok), "{ok}");
        }
        for bad in ["..", ".", "a/b", "a\\b", "", "x y", "a\nb"] {
            assert!(!is_safe_path_segment(bad), "{bad}");
        }
    }
}
