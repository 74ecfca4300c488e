//! Parts of a change envelope's Avro record, for writing records derived from it without
//! decoding and encoding the row again: where a row image's bytes lie in a datum, and the
//! schema of that row image as a stand-alone record schema.

use std::collections::HashMap;
use std::ops::Range;

use serde_json::{Map, Value};

use super::datum::Reader;
use super::schema::Node;
use super::{AvroError, WriterSchema};

impl WriterSchema {
    /// Whether the top-level record has a field of this name.
    pub fn has_field(&self, name: &str) -> bool {
        matches!(&self.root.node, Node::Record(fields) if fields.iter().any(|(n, _)| n == name))
    }

    /// The byte range, within `datum`, of the value of top-level field `field` (an optional
    /// field: a union of null and one type), or `None` when the datum holds null there. Avro's
    /// binary form of a record is its fields' forms one after the other, so this range is a
    /// datum of the field's type on its own.
    pub fn optional_field_bytes(
        &self,
        datum: &[u8],
        field: &str,
    ) -> Result<Option<Range<usize>>, AvroError> {
        let err = |reason: String| AvroError::Datum {
            id: self.id,
            reason,
        };
        let Node::Record(fields) = &self.root.node else {
            return Err(err("the schema is not a record".into()));
        };
        let mut reader = Reader {
            bytes: datum,
            pos: 0,
        };
        for (name, typed) in fields {
            if name != field {
                reader.value(typed).map_err(err)?;
                continue;
            }
            let Node::Union(branches) = &typed.node else {
                return Err(err(format!("field {field} is not optional (not a union)")));
            };
            let index = reader.union_index(branches.len()).map_err(err)?;
            let branch = &branches[index];
            if matches!(branch.node, Node::Null) {
                return Ok(None);
            }
            let start = reader.pos;
            reader.value(branch).map_err(err)?;
            return Ok(Some(start..reader.pos));
        }
        Err(err(format!("the record has no field {field}")))
    }

    /// The schema of top-level field `field`'s record type (the non-null branch of its union)
    /// as a stand-alone schema: its definition wherever the writer schema gives it (Debezium
    /// defines `Value` inside `before` and names it in `after`), with its namespace made
    /// explicit, since outside the envelope there is none to inherit.
    pub fn optional_record_schema(&self, field: &str) -> Result<Map<String, Value>, String> {
        let json: Value = serde_json::from_str(&self.text)
            .map_err(|e| format!("schema {} is not JSON: {e}", self.id))?;
        let root_ns = self.root.name.as_deref().and_then(namespace_of);
        let mut definitions = HashMap::new();
        collect_definitions(&json, None, &mut definitions);
        let branch = json
            .get("fields")
            .and_then(Value::as_array)
            .and_then(|fs| fs.iter().find(|f| f["name"] == field))
            .and_then(|f| f["type"].as_array())
            .and_then(|branches| branches.iter().find(|b| *b != "null"))
            .ok_or_else(|| format!("schema {}: no optional field {field}", self.id))?;
        let (full, definition) = match branch {
            Value::String(name) => {
                let full = qualified(name, root_ns);
                let definition = definitions
                    .get(&full)
                    .or_else(|| definitions.get(name))
                    .ok_or_else(|| format!("schema {}: type {name} is not defined", self.id))?;
                (full, *definition)
            }
            Value::Object(o) => {
                let name = o.get("name").and_then(Value::as_str).unwrap_or_default();
                let ns = o.get("namespace").and_then(Value::as_str).or(root_ns);
                (qualified(name, ns), branch)
            }
            other => {
                return Err(format!(
                    "schema {}: field {field} has type {other}",
                    self.id
                ))
            }
        };
        let Value::Object(mut record) = definition.clone() else {
            return Err(format!("schema {}: {full} is not a record", self.id));
        };
        if record.get("type").and_then(Value::as_str) != Some("record") {
            return Err(format!("schema {}: {full} is not a record", self.id));
        }
        let (ns, name) = full.rsplit_once('.').unwrap_or(("", full.as_str()));
        record.insert("name".into(), Value::String(name.into()));
        if ns.is_empty() {
            record.remove("namespace");
        } else {
            record.insert("namespace".into(), Value::String(ns.into()));
        }
        Ok(record)
    }
}

fn namespace_of(full: &str) -> Option<&str> {
    full.rsplit_once('.').map(|(ns, _)| ns)
}

fn qualified(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    }
}

/// Every named type's definition in a schema's JSON, by full name (Avro's rules: a dotted name
/// is full; otherwise the type's own `namespace`, else the enclosing one).
fn collect_definitions<'a>(
    json: &'a Value,
    namespace: Option<&str>,
    out: &mut HashMap<String, &'a Value>,
) {
    match json {
        Value::Array(branches) => {
            for b in branches {
                collect_definitions(b, namespace, out);
            }
        }
        Value::Object(o) => {
            let kind = o.get("type");
            let named = matches!(
                kind.and_then(Value::as_str),
                Some("record" | "error" | "enum" | "fixed")
            );
            let mut inner = namespace.map(str::to_string);
            if named {
                if let Some(name) = o.get("name").and_then(Value::as_str) {
                    let ns = o.get("namespace").and_then(Value::as_str).or(namespace);
                    let full = qualified(name, ns);
                    inner = namespace_of(&full).map(str::to_string);
                    out.insert(full, json);
                }
            }
            for f in o
                .get("fields")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(t) = f.get("type") {
                    collect_definitions(t, inner.as_deref(), out);
                }
            }
            for key in ["items", "values"] {
                if let Some(t) = o.get(key) {
                    collect_definitions(t, inner.as_deref(), out);
                }
            }
            // `{"type": {...}}`: a type object wrapping another.
            if let Some(t) = kind.filter(|t| !t.is_string()) {
                collect_definitions(t, inner.as_deref(), out);
            }
        }
        _ => {}
    }
}
