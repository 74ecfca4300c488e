//! Where a source table lands: its mirror's name and its lake directory.
//!
//! Both must be injective over everything a source can name: two source tables never share a
//! mirror or a lake directory by accident. Names are joined with `.`, and a `.` or `\` inside a
//! part is escaped with `\`, so `a.b_c` and `a_b.c` (schema `a`, table `b_c`; schema `a_b`,
//! table `c`) stay apart, as do `x.y` and a `public` table literally called `x.y`.
//!
//! Two source databases (two connectors) can both have `public.orders`. The default mirror name
//! leaves the source database out, so both would land in one mirror; the state sink records
//! which source each mirror belongs to and rejects the other's changes with advice to set a
//! template (`state.table_name`) that includes `{server}` or `{db}`.

use std::borrow::Cow;

use crate::domain::{SourceDb, TableId};

/// One part of a dotted name, with `\` and `.` escaped so that joining parts with `.` is
/// injective.
pub fn escape_part(part: &str) -> Cow<'_, str> {
    if !part.contains(['.', '\\']) {
        return Cow::Borrowed(part);
    }
    let mut out = String::with_capacity(part.len() + 2);
    for ch in part.chars() {
        if matches!(ch, '.' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    Cow::Owned(out)
}

/// `schema.table`, escaped ([`escape_part`]): the lake's `table=` name and the default
/// mirror name outside `public`.
pub fn qualified_name(table: &TableId) -> String {
    format!(
        "{}.{}",
        escape_part(&table.schema),
        escape_part(&table.table)
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Server,
    Db,
    Schema,
    Table,
}

/// How mirrors are named: the default, or a `state.table_name` template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MirrorNaming {
    template: Option<Vec<Piece>>,
}

/// The placeholders a template may use, for messages.
pub const PLACEHOLDERS: &str =
    "{server} (source.name, the connector's topic.prefix), {db} (source.db), {schema}, {table}";

impl MirrorNaming {
    /// The default: `<table>` for `public`, `<schema>.<table>` otherwise (one identifier with
    /// a dot in it, so it cannot collide with another schema's table).
    pub fn default_naming() -> Self {
        Self { template: None }
    }

    /// A template such as `{db}.{schema}.{table}`; `{{` and `}}` are literal braces. It must
    /// use `{table}`. Placeholder values are escaped as in [`escape_part`].
    pub fn template(template: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = template;
        while let Some(ch) = rest.chars().next() {
            if rest.starts_with("{{") || rest.starts_with("}}") {
                literal.push(ch);
                rest = &rest[2..];
                continue;
            }
            if ch == '}' {
                return Err(format!(
                    "table_name template {template:?}: unmatched }} (write }}}} for a literal one)"
                ));
            }
            if ch != '{' {
                literal.push(ch);
                rest = &rest[ch.len_utf8()..];
                continue;
            }
            let end = rest.find('}').ok_or_else(|| {
                format!(
                    "table_name template {template:?}: unclosed {{ (write {{{{ for a literal one)"
                )
            })?;
            let piece = match &rest[1..end] {
                "server" => Piece::Server,
                "db" => Piece::Db,
                "schema" => Piece::Schema,
                "table" => Piece::Table,
                other => {
                    return Err(format!(
                        "table_name template {template:?}: unknown placeholder {{{other}}}; known: {PLACEHOLDERS}"
                    ))
                }
            };
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(piece);
            rest = &rest[end + 1..];
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        if !pieces.contains(&Piece::Table) {
            return Err(format!(
                "table_name template {template:?} must use {{table}}, or every table would share one mirror"
            ));
        }
        Ok(Self {
            template: Some(pieces),
        })
    }

    /// From the config value: a template, or the default when unset.
    pub fn from_config(template: Option<&str>) -> Result<Self, String> {
        template.map_or_else(|| Ok(Self::default_naming()), Self::template)
    }

    /// True when names depend on the source database, so two sources never share a mirror.
    pub fn is_source_aware(&self) -> bool {
        self.template
            .as_ref()
            .is_some_and(|p| p.iter().any(|p| matches!(p, Piece::Server | Piece::Db)))
    }

    /// The mirror name of `table` from `source`.
    pub fn mirror_name(&self, source: &SourceDb, table: &TableId) -> String {
        let Some(pieces) = &self.template else {
            return if table.schema == "public" {
                escape_part(&table.table).into_owned()
            } else {
                qualified_name(table)
            };
        };
        let mut out = String::new();
        for p in pieces {
            match p {
                Piece::Literal(s) => out.push_str(s),
                Piece::Server => out.push_str(&escape_part(&source.server)),
                Piece::Db => out.push_str(&escape_part(&source.db)),
                Piece::Schema => out.push_str(&escape_part(&table.schema)),
                Piece::Table => out.push_str(&escape_part(&table.table)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, table: &str) -> TableId {
        TableId::new(schema, table)
    }

    #[test]
    fn the_default_names_cannot_collide() {
        let n = MirrorNaming::default_naming();
        let src = SourceDb::default();
        let tables = [
            t("public", "orders"),
            t("public", "x_y"),
            t("x", "y"),
            t("public", "x.y"),
            t("a", "b_c"),
            t("a_b", "c"),
            t("a.b", "c"),
            t("a", "b.c"),
            t("a\\", "b"),
            t("a", "\\b"),
            t("orders", "public"),
        ];
        let names: Vec<String> = tables.iter().map(|x| n.mirror_name(&src, x)).collect();
        let distinct: std::collections::BTreeSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        assert_eq!(names[0], "orders");
        assert_eq!(names[2], "x.y");
        assert_eq!(names[3], "x\\.y");
        assert_eq!(names[5], "a_b.c");
    }

    #[test]
    fn templates_render_and_reject_what_they_cannot_name() {
        let n = MirrorNaming::template("{db}.{schema}.{table}").unwrap();
        assert!(n.is_source_aware());
        let a = SourceDb {
            server: "s1".into(),
            db: "shop.eu".into(),
        };
        assert_eq!(
            n.mirror_name(&a, &t("public", "orders")),
            "shop\\.eu.public.orders"
        );
        let braces = MirrorNaming::template("{{x}}_{server}_{table}").unwrap();
        assert_eq!(
            braces.mirror_name(&a, &t("public", "orders")),
            "{x}_s1_orders"
        );
        assert!(!MirrorNaming::template("{schema}_{table}")
            .unwrap()
            .is_source_aware());
        assert!(!MirrorNaming::default_naming().is_source_aware());
        for bad in ["{schema}", "{tabel}", "{table", "{table}}", "x}"] {
            assert!(MirrorNaming::template(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn qualified_names_are_injective() {
        assert_ne!(
            qualified_name(&t("a.b", "c")),
            qualified_name(&t("a", "b.c"))
        );
        assert_eq!(qualified_name(&t("public", "books")), "public.books");
    }
}
