//! A routed record: the value in the filter's shape with `filterMetadata`, the source key as
//! received, and the source coordinates in headers (the route sink recovers its progress from
//! them; consumers can use them to trace a record to the raw log).

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use super::spec::{Filter, OutputShape};
use crate::envelope::{ChangeEvent, Op};

/// Header names on every routed record.
pub const HEADER_TOPIC: &str = "cdc.source.topic";
pub const HEADER_PARTITION: &str = "cdc.source.partition";
pub const HEADER_OFFSET: &str = "cdc.source.offset";
pub const HEADER_FILTER: &str = "cdc.filter.id";

/// Renders the routed values of one change: each shape's JSON text is made once per change,
/// and each filter's record is that text with its own `filterMetadata` spliced in, so ten
/// filters matching one change parse and serialise it once.
pub struct Rendered<'a> {
    change: &'a ChangeEvent,
    envelope: Option<Result<String, String>>,
    after: Option<Result<String, String>>,
}

impl<'a> Rendered<'a> {
    pub fn new(change: &'a ChangeEvent) -> Self {
        Self {
            change,
            envelope: None,
            after: None,
        }
    }

    /// The value of the routed record for `filter`, as JSON text.
    pub fn value(
        &mut self,
        filter: &Filter,
        filtered_at: DateTime<Utc>,
    ) -> Result<Vec<u8>, String> {
        let e = self.change;
        let body = match filter.output {
            OutputShape::Envelope => self.envelope.get_or_insert_with(|| envelope_text(e)),
            OutputShape::After => self.after.get_or_insert_with(|| after_text(e)),
        };
        let body = body.as_ref().map_err(Clone::clone)?;
        let metadata = json!({
            "filterId": filter.id,
            "consumerId": filter.consumer,
            "filteredAt": filtered_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        // `body` is a serialised JSON object: `{...}` becomes `{...,"filterMetadata":{...}}`.
        let inner = &body[1..body.len() - 1];
        let mut out = Vec::with_capacity(body.len() + 128);
        out.push(b'{');
        out.extend_from_slice(inner.as_bytes());
        if !inner.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(b"\"filterMetadata\":");
        serde_json::to_writer(&mut out, &metadata).map_err(|err| err.to_string())?;
        out.push(b'}');
        Ok(out)
    }
}

/// The value of the routed record of change `e` for `filter`, as JSON text.
pub fn value(
    filter: &Filter,
    e: &ChangeEvent,
    filtered_at: DateTime<Utc>,
) -> Result<Vec<u8>, String> {
    Rendered::new(e).value(filter, filtered_at)
}

/// The Debezium envelope as received (the payload of JsonConverter's `{schema, payload}`,
/// whose schema would not describe filterMetadata), as compact JSON text.
fn envelope_text(e: &ChangeEvent) -> Result<String, String> {
    let received: Value = serde_json::from_str(&e.raw_value)
        .map_err(|err| format!("the received envelope is not JSON text: {err}"))?;
    let object = match received {
        Value::Object(mut o) if o.contains_key("payload") && o.contains_key("schema") => {
            match o.remove("payload") {
                Some(Value::Object(p)) => p,
                _ => return Err("the envelope's payload is not an object".into()),
            }
        }
        Value::Object(o) => o,
        _ => return Err("the received envelope is not a JSON object".into()),
    };
    let mut object = object;
    // Ours is the only filterMetadata (a record routed twice keeps one key).
    object.shift_remove("filterMetadata");
    serde_json::to_string(&object).map_err(|err| err.to_string())
}

/// The row image in the shape of `ExtractNewRecordState` with `delete.handling.mode=rewrite`:
/// `after` (for a delete the `before` image, else the key) with `__op` and `__deleted`.
fn after_text(e: &ChangeEvent) -> Result<String, String> {
    let image = if e.op == Op::Delete {
        e.before
            .as_ref()
            .or(e.key.as_ref().and_then(Value::as_object))
    } else {
        e.after.as_ref()
    };
    let mut row: Map<String, Value> = image.cloned().unwrap_or_default();
    row.insert("__op".into(), Value::String(e.op.code().into()));
    row.insert(
        "__deleted".into(),
        Value::String((e.op == Op::Delete).to_string()),
    );
    row.shift_remove("filterMetadata");
    serde_json::to_string(&row).map_err(|err| err.to_string())
}

/// The routed record's key: the source record's key as received.
pub fn key(e: &ChangeEvent) -> Option<&[u8]> {
    e.raw_key.as_deref().map(str::as_bytes)
}

/// The headers of the routed record of change `e` for filter `filter_id`.
pub fn headers(e: &ChangeEvent, filter_id: &str) -> [(&'static str, String); 4] {
    [
        (HEADER_TOPIC, e.coords.topic.clone()),
        (HEADER_PARTITION, e.coords.partition.to_string()),
        (HEADER_OFFSET, e.coords.offset.to_string()),
        (HEADER_FILTER, filter_id.to_string()),
    ]
}
