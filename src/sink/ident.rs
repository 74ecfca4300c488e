//! SQL identifiers and object-store path segments derived from message content. Everything that
//! reaches SQL text or a path goes through here: validated, then quoted.

use crate::domain::Ident;

/// Quotes any identifier for PostgreSQL (see [`Ident`]); the error is the reason it cannot be one.
pub fn quote_ident(s: &str) -> Result<String, String> {
    Ident::new(s)
        .map(|i| i.quoted().to_string())
        .map_err(|e| e.to_string())
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

/// A lake path segment for any name (a table, a topic): bytes other than ASCII letters,
/// digits and `._-+` are percent-encoded (`=` and `/` included, so Hive-style readers still
/// split `table=<segment>` correctly and nothing escapes its directory), as are names made only
/// of dots. Injective, so two names never share a directory. A name whose segment would pass
/// 200 bytes keeps a readable head and a hash of the whole name.
pub fn lake_path_segment(name: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+');
    let all_dots = !name.is_empty() && name.bytes().all(|b| b == b'.');
    if !name.is_empty() && !all_dots && name.len() <= 200 && name.bytes().all(plain) {
        return std::borrow::Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    for b in name.bytes() {
        if plain(b) && !(all_dots && b == b'.') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00empty");
    }
    if out.len() > 200 {
        // FNV-1a of the whole name: stable across builds and platforms (std's hasher is not).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        // The encoded text is ASCII; never cut inside a %XX escape.
        let head = 150;
        let cut = out[..head]
            .rfind('%')
            .filter(|i| head - i < 3)
            .unwrap_or(head);
        out = format!("{}~{h:016x}", &out[..cut]);
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lake_segments_are_safe_and_injective() {
        assert_eq!(lake_path_segment("public.books"), "public.books");
        assert_eq!(lake_path_segment(".."), "%2E%2E");
        assert_eq!(lake_path_segment("."), "%2E");
        assert_eq!(lake_path_segment("a/b"), "a%2Fb");
        assert_eq!(lake_path_segment("a=b"), "a%3Db");
        assert_eq!(lake_path_segment("a\0b"), "a%00b");
        assert_eq!(lake_path_segment("a%2Fb"), "a%252Fb", "% itself is encoded");
        assert_eq!(lake_path_segment("café"), "caf%C3%A9");
        for name in [".", "..", "a/b", "a=b", "a\0b", "x y", "é", "a%2Fb"] {
            assert!(
                is_safe_path_segment(&lake_path_segment(name).replace('%', "=")),
                "{name}"
            );
        }
        let long_a = "é".repeat(300);
        let long_b = format!("{}x", "é".repeat(299));
        let (a, b) = (lake_path_segment(&long_a), lake_path_segment(&long_b));
        assert!(a.len() <= 200 && b.len() <= 200, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn identifiers_are_validated_and_quoted() {
        for ok in ["books", "order_items", "_x1"] {
            assert!(crate::domain::is_plain_ident(ok), "{ok}");
        }
        for bad in ["", "1abc", "a-b", "a;drop", "é", &"x".repeat(64)] {
            assert!(!crate::domain::is_plain_ident(bad), "{bad}");
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
