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

/// The value of the routed record of change `e` for `filter`, as JSON text.
pub fn value(
    filter: &Filter,
    e: &ChangeEvent,
    filtered_at: DateTime<Utc>,
) -> Result<Vec<u8>, String> {
    let metadata = json!({
        "filterId": filter.id,
        "consumerId": filter.consumer,
        "filteredAt": filtered_at.to_rfc3339_opts(SecondsFormat::Millis, true),
    });
    let mut out: Map<String, Value> = match filter.output {
        OutputShape::Envelope => {
            let received: Value = serde_json::from_str(&e.raw_value)
                .map_err(|err| format!("the received envelope is not JSON text: {err}"))?;
            match received {
                // JsonConverter's `{schema, payload}`: the envelope is the payload (the schema
                // would not describe filterMetadata).
                Value::Object(mut o) if o.contains_key("payload") && o.contains_key("schema") => {
                    match o.remove("payload") {
                        Some(Value::Object(p)) => p,
                        _ => return Err("the envelope's payload is not an object".into()),
                    }
                }
                Value::Object(o) => o,
                _ => return Err("the received envelope is not a JSON object".into()),
            }
        }
        OutputShape::After => {
            let image = if e.op == Op::Delete {
                e.before
                    .as_ref()
                    .or(e.key.as_ref().and_then(Value::as_object))
            } else {
                e.after.as_ref()
            };
            let mut row = image.cloned().unwrap_or_default();
            row.insert("__op".into(), Value::String(e.op.code().into()));
            row.insert(
                "__deleted".into(),
                Value::String((e.op == Op::Delete).to_string()),
            );
            row
        }
    };
    out.insert("filterMetadata".into(), metadata);
    serde_json::to_vec(&out).map_err(|err| err.to_string())
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
