//! Avro's binary encoding, read against a compiled schema into JsonConverter's payload form.

use base64::Engine as _;
use serde_json::{Map, Number, Value};

use super::schema::{Node, Typed};

/// Reads Avro's binary encoding (https://avro.apache.org/docs/1.11.1/specification/#binary-encoding).
///
/// Reading recurses once per nested record, array or map of the schema, so its depth is the
/// schema's: `compile` refuses recursive named types, and the schema JSON itself parses at
/// most serde_json's 128 levels deep.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| format!("needs {n} more bytes at byte {}, past the end", self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// A zig-zag varint (int and long share it).
    fn long(&mut self) -> Result<i64, String> {
        let mut raw: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.take(1)?.first().expect("one byte");
            raw |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok((raw >> 1) as i64 ^ -((raw & 1) as i64));
            }
        }
        Err(format!(
            "a varint longer than 10 bytes at byte {}",
            self.pos
        ))
    }

    fn int(&mut self) -> Result<i64, String> {
        let v = self.long()?;
        i32::try_from(v)
            .map(i64::from)
            .map_err(|_| format!("int {v} is out of range"))
    }

    fn len(&mut self) -> Result<usize, String> {
        let n = self.long()?;
        usize::try_from(n).map_err(|_| format!("negative length {n}"))
    }

    pub(super) fn value(&mut self, t: &Typed) -> Result<Value, String> {
        Ok(match &t.node {
            Node::Null => Value::Null,
            Node::Boolean => match self.take(1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("boolean byte {b}")),
            },
            Node::Int => Value::from(self.int()?),
            Node::Long => Value::from(self.long()?),
            Node::Float => {
                let v = f32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
                // The f32's own shortest text (3.14, not 3.140000104904175), as Jackson writes it.
                float(f64::from(v), || format!("{v:?}"))
            }
            Node::Double => {
                let v = f64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
                float(v, || format!("{v:?}"))
            }
            Node::Bytes => {
                let n = self.len()?;
                base64(self.take(n)?)
            }
            Node::Fixed(n) => base64(self.take(*n)?),
            Node::String => {
                let n = self.len()?;
                let s = std::str::from_utf8(self.take(n)?)
                    .map_err(|e| format!("a string is not UTF-8: {e}"))?;
                Value::String(s.to_string())
            }
            Node::Enum(symbols) => {
                let i = self.int()?;
                let s = usize::try_from(i)
                    .ok()
                    .and_then(|i| symbols.get(i))
                    .ok_or_else(|| format!("enum index {i} of {} symbols", symbols.len()))?;
                Value::String(s.clone())
            }
            Node::Array(items) => {
                let mut out = Vec::new();
                self.blocks(|r| {
                    out.push(r.value(items)?);
                    Ok(())
                })?;
                Value::Array(out)
            }
            Node::Map(values) => {
                let mut out = Map::new();
                self.blocks(|r| {
                    let n = r.len()?;
                    let k = std::str::from_utf8(r.take(n)?)
                        .map_err(|e| format!("a map key is not UTF-8: {e}"))?
                        .to_string();
                    out.insert(k, r.value(values)?);
                    Ok(())
                })?;
                Value::Object(out)
            }
            Node::Record(fields) => {
                let mut out = Map::with_capacity(fields.len());
                for (name, f) in fields {
                    out.insert(name.clone(), self.value(f)?);
                }
                Value::Object(out)
            }
            Node::Union(branches) => {
                let i = self.union_index(branches.len())?;
                self.value(&branches[i])?
            }
        })
    }

    /// A union's branch index, checked against its number of branches.
    pub(super) fn union_index(&mut self, branches: usize) -> Result<usize, String> {
        let i = self.long()?;
        usize::try_from(i)
            .ok()
            .filter(|i| *i < branches)
            .ok_or_else(|| format!("union branch {i} of {branches}"))
    }

    /// Arrays and maps: blocks of items until a zero count; a negative count is followed by
    /// the block's size in bytes.
    fn blocks(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        loop {
            let mut count = self.long()?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                count = count.checked_neg().ok_or("block count overflows")?;
                self.long()?;
            }
            for _ in 0..count {
                item(self)?;
            }
        }
    }
}

/// A float as JsonConverter writes it: the shortest text that reads back as the same value,
/// and non-finite values as strings.
fn float(v: f64, text: impl FnOnce() -> String) -> Value {
    if v.is_nan() {
        Value::String("NaN".into())
    } else if v.is_infinite() {
        Value::String(if v > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        serde_json::from_str::<Number>(&text())
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

fn base64(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}
