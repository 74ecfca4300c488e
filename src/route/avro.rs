//! Avro output (`format: avro`): the routed record in the filter's shape, encoded with a schema
//! derived from the source record's writer schema, with `filterMetadata` in it.
//!
//! Avro's binary form of a record is the forms of its fields one after the other, and the
//! added fields come last, so a routed datum is the source datum (or the bytes of its row
//! image) followed by the added fields' bytes: the row is never decoded and encoded again, and
//! every value keeps the exact bytes Debezium wrote.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::spec::{Filter, OutputShape};
use crate::envelope::avro::{unframe, WriterSchema, MAGIC};
use crate::envelope::Op;

/// The field every routed record gets.
pub const METADATA_FIELD: &str = "filterMetadata";

/// The `filterMetadata` field's schema: `filteredAt` as a millisecond timestamp, with the
/// Connect name Debezium's own timestamps carry, so Connect's AvroConverter reads it as one.
fn metadata_field() -> Value {
    json!({
        "name": METADATA_FIELD,
        "type": {
            "type": "record",
            "name": "FilterMetadata",
            "namespace": "io.cdclake.route",
            "fields": [
                {"name": "filterId", "type": "string"},
                {"name": "consumerId", "type": "string"},
                {"name": "filteredAt", "type": {
                    "type": "long",
                    "logicalType": "timestamp-millis",
                    "connect.name": "org.apache.kafka.connect.data.Timestamp",
                    "connect.version": 1
                }}
            ]
        }
    })
}

/// The fields the `after` shape adds before `filterMetadata`, as Debezium's
/// `ExtractNewRecordState` (`add.fields=op`, `delete.handling.mode=rewrite`) adds them.
fn rewrite_fields() -> [Value; 2] {
    [
        json!({"name": "__op", "type": ["null", "string"], "default": null}),
        json!({"name": "__deleted", "type": ["null", "string"], "default": null}),
    ]
}

/// The value schema (JSON text) of a filter's records built from records of `writer`.
pub fn output_schema(writer: &WriterSchema, shape: OutputShape) -> Result<String, String> {
    let mut record = match shape {
        OutputShape::Envelope => match serde_json::from_str(writer.text()) {
            Ok(Value::Object(o)) => o,
            _ => return Err(format!("writer schema {} is not a record", writer.id())),
        },
        OutputShape::After => writer.optional_record_schema("after")?,
    };
    let fields = record
        .get_mut("fields")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| format!("writer schema {} has no fields", writer.id()))?;
    let mut added: Vec<Value> = match shape {
        OutputShape::Envelope => Vec::new(),
        OutputShape::After => rewrite_fields().into(),
    };
    added.push(metadata_field());
    for field in &added {
        let name = &field["name"];
        if fields.iter().any(|f| &f["name"] == name) {
            return Err(format!(
                "writer schema {} already has a field {name}, which the routed record adds",
                writer.id()
            ));
        }
    }
    fields.extend(added);
    Ok(Value::Object(record).to_string())
}

/// Why a `format: avro` filter does not route a change that arrived as JSON.
pub const JSON_INPUT: &str =
    "format avro is built from the source record's Avro bytes, and this change came as JSON";

/// [`value`] from the source record's value as received (framed).
pub fn value_of_record(
    filter: &Filter,
    writer: &WriterSchema,
    framed: &[u8],
    op: Op,
    output_id: u32,
    filtered_at: DateTime<Utc>,
) -> Result<Vec<u8>, String> {
    let (_, datum) = unframe(framed).map_err(|e| e.to_string())?;
    value(filter, writer, datum, op, output_id, filtered_at)
}

/// The routed record's value: Confluent framing with the output schema's id `output_id`, then
/// the datum in the filter's shape.
pub fn value(
    filter: &Filter,
    writer: &WriterSchema,
    source_datum: &[u8],
    op: Op,
    output_id: u32,
    filtered_at: DateTime<Utc>,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(source_datum.len() + 64);
    out.push(MAGIC);
    out.extend_from_slice(&output_id.to_be_bytes());
    match filter.output {
        OutputShape::Envelope => out.extend_from_slice(source_datum),
        OutputShape::After => {
            // A delete's row is its `before` image, of the same record type.
            let image = if op == Op::Delete { "before" } else { "after" };
            let range = writer
                .optional_field_bytes(source_datum, image)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("the change has no {image} image to route"))?;
            out.extend_from_slice(&source_datum[range]);
            // Both optional strings: union branch 1, then the text.
            for text in [op.code(), if op == Op::Delete { "true" } else { "false" }] {
                write_long(&mut out, 1);
                write_string(&mut out, text);
            }
        }
    }
    write_string(&mut out, &filter.id);
    write_string(&mut out, &filter.consumer);
    write_long(&mut out, filtered_at.timestamp_millis());
    Ok(out)
}

/// Avro's zig-zag varint.
fn write_long(out: &mut Vec<u8>, v: i64) {
    let mut n = ((v << 1) ^ (v >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    write_long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::spec::Routes;

    /// Debezium's layout: `Value` defined inside `before`, named in `after`, inheriting the
    /// envelope's namespace.
    const ENVELOPE: &str = r#"{"type":"record","name":"Envelope","namespace":"db.public.orders","fields":[
        {"name":"before","type":["null",{"type":"record","name":"Value","fields":[
            {"name":"id","type":"int"},{"name":"status","type":"string"}]}],"default":null},
        {"name":"after","type":["null","Value"],"default":null},
        {"name":"op","type":"string"}]}"#;

    fn filter(shape: &str) -> Filter {
        let yaml = format!(
            "filters:\n  - id: f1\n    consumer: team\n    topic: out\n    output: {shape}\n    format: avro\n"
        );
        Routes::parse("r.yaml", &yaml).unwrap().filters.remove(0)
    }

    /// A datum of ENVELOPE: before null, after {id, status}, op.
    fn datum(id: i64, status: &str, op: &str) -> Vec<u8> {
        let mut d = vec![0x00, 0x02];
        write_long(&mut d, id);
        write_string(&mut d, status);
        write_string(&mut d, op);
        d
    }

    #[test]
    fn the_envelope_shape_appends_metadata_to_the_source_datum() {
        let w = WriterSchema::parse(5, ENVELOPE).unwrap();
        let schema = output_schema(&w, OutputShape::Envelope).unwrap();
        let out = WriterSchema::parse(9, &schema).unwrap();
        let at = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        let source = datum(7, "cancelled", "c");
        let v = value(&filter("envelope"), &w, &source, Op::Create, 9, at).unwrap();
        assert_eq!(&v[..5], &[0, 0, 0, 0, 9]);
        let decoded = out.decode(&v[5..]).unwrap();
        assert_eq!(decoded["after"], json!({"id": 7, "status": "cancelled"}));
        assert_eq!(
            decoded["filterMetadata"],
            json!({"filterId": "f1", "consumerId": "team", "filteredAt": 1_700_000_000_123i64})
        );
    }

    #[test]
    fn the_after_shape_is_the_row_record_with_the_rewrite_fields() {
        let w = WriterSchema::parse(5, ENVELOPE).unwrap();
        let schema: Value =
            serde_json::from_str(&output_schema(&w, OutputShape::After).unwrap()).unwrap();
        assert_eq!(schema["name"], "Value");
        assert_eq!(schema["namespace"], "db.public.orders");
        let out = WriterSchema::parse(9, &schema.to_string()).unwrap();
        let at = DateTime::from_timestamp_millis(0).unwrap();
        let v = value(
            &filter("after"),
            &w,
            &datum(7, "new", "u"),
            Op::Update,
            9,
            at,
        )
        .unwrap();
        assert_eq!(
            out.decode(&v[5..]).unwrap(),
            json!({"id": 7, "status": "new", "__op": "u", "__deleted": "false",
                   "filterMetadata": {"filterId": "f1", "consumerId": "team", "filteredAt": 0}})
        );
        // A delete: the before image; none at all is an error, not a record.
        let mut delete = vec![0x02];
        write_long(&mut delete, 8);
        write_string(&mut delete, "gone");
        delete.push(0x00);
        write_string(&mut delete, "d");
        let v = value(&filter("after"), &w, &delete, Op::Delete, 9, at).unwrap();
        let row = out.decode(&v[5..]).unwrap();
        assert_eq!(
            (row["id"].clone(), row["__deleted"].clone()),
            (json!(8), json!("true"))
        );
        let mut neither = vec![0x00, 0x00];
        write_string(&mut neither, "d");
        let err = value(&filter("after"), &w, &neither, Op::Delete, 9, at).unwrap_err();
        assert!(err.contains("no before image"), "{err}");
    }

    #[test]
    fn a_source_schema_with_the_added_field_is_refused() {
        let clash = ENVELOPE.replace(
            r#"{"name":"op","type":"string"}"#,
            r#"{"name":"filterMetadata","type":"string"}"#,
        );
        let w = WriterSchema::parse(5, &clash).unwrap();
        let err = output_schema(&w, OutputShape::Envelope).unwrap_err();
        assert!(err.contains("filterMetadata"), "{err}");
    }

    #[test]
    fn avro_filters_need_avro_input_and_a_registry() {
        let routes = Routes::parse(
            "r.yaml",
            "filters:\n  - id: j\n    consumer: t\n    topic: a\n  - id: f1\n    consumer: t\n    topic: b\n    format: avro\n",
        )
        .unwrap();
        assert!(routes.check_avro_output(true, true).is_ok());
        for (reads_avro, registry, want) in [
            (false, true, "kafka.format is json"),
            (true, false, "schema_registry"),
        ] {
            let errors = routes.check_avro_output(reads_avro, registry).unwrap_err();
            assert_eq!(errors.len(), 1, "only the avro filter");
            let text = errors[0].to_string();
            assert!(
                text.starts_with("r.yaml:5: filter \"f1\"") && text.contains(want),
                "{text}"
            );
        }
    }

    #[test]
    fn longs_are_zig_zag() {
        for (v, bytes) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            write_long(&mut out, v);
            assert_eq!(out, bytes, "{v}");
        }
        let mut out = Vec::new();
        write_long(&mut out, i64::MIN);
        assert_eq!(out.len(), 10);
    }
}
