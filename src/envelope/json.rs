//! JSON as deep as PostgreSQL's jsonb takes it.
//!
//! serde_json stops at 128 levels by default; PostgreSQL (with its default `max_stack_depth` of
//! 2 MB) parses jsonb documents of more than 10,000 levels. cdc-lake parses up to
//! [`MAX_DEPTH`] levels and rejects deeper records with a reason before parsing, so hostile
//! input can never exhaust the stack. Parsing, converting, serialising and dropping such a
//! document recurses once per level: the pod's threads get [`THREAD_STACK_BYTES`] of stack
//! (reserved address space; only the pages a deep document touches are used).

use serde::Deserialize;

/// The deepest nesting of arrays and objects a record may have.
pub const MAX_DEPTH: usize = 16_000;

/// Stack of every thread that handles decoded values (runtime workers, the poll thread).
pub const THREAD_STACK_BYTES: usize = 64 << 20;

/// The nesting depth of `text` when it passes `max`, else None. Counts `[` and `{` outside
/// strings; one pass, skipped for text too short to nest that deep.
pub fn exceeds_depth(text: &[u8], max: usize) -> Option<usize> {
    if text.len() <= max {
        return None;
    }
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in text {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    (deepest > max).then_some(deepest)
}

/// The reason a record or document is refused for its depth.
pub fn too_deep_reason(what: &str, depth: usize) -> String {
    format!(
        "{what} nests {depth} levels deep, more than the {MAX_DEPTH} cdc-lake parses (PostgreSQL's jsonb takes about 10,000 with its default max_stack_depth)"
    )
}

/// `serde_json::from_str` without the 128-level limit. Callers check [`exceeds_depth`]
/// first.
pub fn from_str<'a, T: Deserialize<'a>>(text: &'a str) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let value = T::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn nested(depth: usize) -> String {
        format!(
            r#"{{"a":{}1{}}}"#,
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    }

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert_eq!(exceeds_depth(b"[[1]]", 1), Some(2));
        assert_eq!(exceeds_depth(b"[[1]]", 2), None);
        assert_eq!(exceeds_depth(br#"["[[[[", "\"[[[["]"#, 1), None);
        let deep = nested(MAX_DEPTH + 1);
        assert_eq!(
            exceeds_depth(deep.as_bytes(), MAX_DEPTH),
            Some(MAX_DEPTH + 1)
        );
        assert_eq!(exceeds_depth(nested(MAX_DEPTH).as_bytes(), MAX_DEPTH), None);
    }

    /// The deepest document allowed parses, serialises and drops on a thread of the pod's
    /// stack size (a 2 MiB thread overflows on it).
    #[test]
    fn the_deepest_document_fits_the_pods_stack() {
        let text = nested(MAX_DEPTH);
        std::thread::Builder::new()
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || {
                let v: Value = from_str(&text).unwrap();
                let back = serde_json::to_string(&v).unwrap();
                assert_eq!(back, text);
                let again: Value = from_str(&back).unwrap();
                assert_eq!(again, v);
                drop((v, again));
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
