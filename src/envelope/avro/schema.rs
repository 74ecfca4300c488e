//! A writer schema compiled into a decoding plan, and the Connect schema it stands for.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

/// One node of a compiled writer schema.
#[derive(Debug, Clone)]
pub(super) enum Node {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Fixed(usize),
    Enum(Vec<String>),
    Array(Box<Typed>),
    Map(Box<Typed>),
    Record(Vec<(String, Typed)>),
    Union(Vec<Typed>),
}

/// A node with the Connect attributes the schema JSON gives it.
#[derive(Debug, Clone)]
pub(super) struct Typed {
    pub(super) node: Node,
    /// `connect.name` (or, for records, the Avro full name).
    pub(super) name: Option<String>,
    pub(super) version: Option<Value>,
    /// `connect.parameters`, plus a decimal's scale and precision from `logicalType`.
    pub(super) parameters: Map<String, Value>,
    /// `connect.type` (`int8`, `int16`) when narrower than the Avro type.
    pub(super) connect_type: Option<String>,
}

pub(super) fn compile(
    json: &Value,
    namespace: Option<&str>,
    named: &mut HashMap<String, Typed>,
) -> Result<Typed, String> {
    let plain = |node| Typed {
        node,
        name: None,
        version: None,
        parameters: Map::new(),
        connect_type: None,
    };
    let obj = match json {
        Value::String(name) => {
            return primitive(name)
                .map(plain)
                .or_else(|| {
                    let full = full_name(name, namespace);
                    named.get(&full).or_else(|| named.get(name)).cloned()
                })
                .ok_or_else(|| format!("unknown type {name:?}"))
        }
        Value::Array(branches) => {
            let branches = branches
                .iter()
                .map(|b| compile(b, namespace, named))
                .collect::<Result<_, _>>()?;
            return Ok(plain(Node::Union(branches)));
        }
        Value::Object(obj) => obj,
        other => return Err(format!("a type is a string, array or object, not {other}")),
    };
    let ty = obj.get("type").ok_or("a type object without \"type\"")?;
    let text = |k: &str| obj.get(k).and_then(Value::as_str);
    let mut typed = match ty.as_str() {
        Some("record" | "error") => {
            let name = text("name").ok_or("a record without a name")?;
            let full = full_name(name, text("namespace").or(namespace));
            let inner_ns = full.rsplit_once('.').map(|(ns, _)| ns.to_string());
            let mut fields = Vec::new();
            for f in obj
                .get("fields")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("record {full} has no fields array"))?
            {
                let fname = f
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("a field of {full} has no name"))?;
                let ftype = f
                    .get("type")
                    .ok_or_else(|| format!("field {full}.{fname} has no type"))?;
                fields.push((
                    fname.to_string(),
                    compile(ftype, inner_ns.as_deref(), named)?,
                ));
            }
            let mut t = plain(Node::Record(fields));
            t.name = Some(full.clone());
            named.insert(full, t.clone());
            t
        }
        Some("enum") => {
            let name = text("name").ok_or("an enum without a name")?;
            let symbols = obj
                .get("symbols")
                .and_then(Value::as_array)
                .ok_or("an enum without symbols")?
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or("an enum symbol is not a string")
                })
                .collect::<Result<_, _>>()?;
            let t = plain(Node::Enum(symbols));
            named.insert(full_name(name, text("namespace").or(namespace)), t.clone());
            t
        }
        Some("fixed") => {
            let name = text("name").ok_or("a fixed without a name")?;
            let size = obj
                .get("size")
                .and_then(Value::as_u64)
                .ok_or("a fixed without a size")?;
            let t = plain(Node::Fixed(size as usize));
            named.insert(full_name(name, text("namespace").or(namespace)), t.clone());
            t
        }
        Some("array") => plain(Node::Array(Box::new(compile(
            obj.get("items").ok_or("an array without items")?,
            namespace,
            named,
        )?))),
        Some("map") => plain(Node::Map(Box::new(compile(
            obj.get("values").ok_or("a map without values")?,
            namespace,
            named,
        )?))),
        // {"type": "long", "connect.name": ...}: a primitive with attributes, or a nested type.
        _ => compile(ty, namespace, named)?,
    };
    if let Some(name) = text("connect.name") {
        typed.name = Some(name.to_string());
    }
    if let Some(v) = obj.get("connect.version") {
        typed.version = Some(v.clone());
    }
    if let Some(Value::Object(p)) = obj.get("connect.parameters") {
        typed.parameters.extend(p.clone());
    }
    if let Some(t) = text("connect.type") {
        typed.connect_type = Some(t.to_string());
    }
    if text("logicalType") == Some("decimal") {
        typed
            .name
            .get_or_insert_with(|| "org.apache.kafka.connect.data.Decimal".into());
        let param = |k: &str| obj.get(k).map(|v| Value::String(v.to_string()));
        if let Some(scale) = param("scale") {
            typed.parameters.entry("scale").or_insert(scale);
        } else {
            typed
                .parameters
                .entry("scale")
                .or_insert_with(|| "0".into());
        }
        // As Confluent's AvroData reads it back: precision 64 is its default for decimals that
        // had none in Connect, so it is not a declared precision.
        if let Some(precision) = param("precision").filter(|p| p.as_str() != Some("64")) {
            typed
                .parameters
                .entry("connect.decimal.precision")
                .or_insert(precision);
        }
    }
    Ok(typed)
}

fn primitive(name: &str) -> Option<Node> {
    Some(match name {
        "null" => Node::Null,
        "boolean" => Node::Boolean,
        "int" => Node::Int,
        "long" => Node::Long,
        "float" => Node::Float,
        "double" => Node::Double,
        "bytes" => Node::Bytes,
        "string" => Node::String,
        _ => return None,
    })
}

fn full_name(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    }
}

/// The Connect schema of a node, as JsonConverter writes it (`field` set for struct fields).
pub(super) fn connect_schema(t: &Typed, field: Option<&str>) -> Value {
    // ["null", T] and [T, "null"] are Connect's optional T.
    let (t, optional) = match &t.node {
        Node::Union(branches) if branches.len() == 2 => {
            match branches.iter().position(|b| matches!(b.node, Node::Null)) {
                Some(i) => (&branches[1 - i], true),
                None => (t, false),
            }
        }
        _ => (t, false),
    };
    let ty = match &t.node {
        Node::Null => "null",
        Node::Boolean => "boolean",
        Node::Int => t.connect_type.as_deref().unwrap_or("int32"),
        Node::Long => "int64",
        Node::Float => "float",
        Node::Double => "double",
        Node::Bytes | Node::Fixed(_) => "bytes",
        Node::String | Node::Enum(_) => "string",
        Node::Array(_) => "array",
        Node::Map(_) => "map",
        Node::Record(_) | Node::Union(_) => "struct",
    };
    let mut out = Map::new();
    out.insert("type".into(), json!(ty));
    match &t.node {
        Node::Record(fields) => {
            let fields: Vec<Value> = fields
                .iter()
                .map(|(name, f)| connect_schema(f, Some(name)))
                .collect();
            out.insert("fields".into(), Value::Array(fields));
        }
        Node::Array(items) => {
            out.insert("items".into(), connect_schema(items, None));
        }
        Node::Map(values) => {
            out.insert("keys".into(), json!({"type": "string", "optional": false}));
            out.insert("values".into(), connect_schema(values, None));
        }
        _ => {}
    }
    out.insert("optional".into(), json!(optional));
    if let Some(name) = &t.name {
        out.insert("name".into(), json!(name));
    }
    if let Some(v) = &t.version {
        out.insert("version".into(), v.clone());
    }
    if !t.parameters.is_empty() {
        out.insert("parameters".into(), Value::Object(t.parameters.clone()));
    }
    if let Some(f) = field {
        out.insert("field".into(), json!(f));
    }
    Value::Object(out)
}
