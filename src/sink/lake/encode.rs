//! Encodes one lake file: change events of one table, one date and one offset range, as Parquet
//! with `before`/`after` as typed structs and the original envelope kept for losslessness.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, StringBuilder, StructArray,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, TimeUnit as ArrowUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

pub use super::columns::arrow_type;
use super::columns::row_struct;
use crate::envelope::avro::WriterSchema;
use crate::envelope::{ChangeEvent, RowSchema};

/// The file metadata key of an Avro file's Connect schemas: a JSON object from each writer
/// schema id in `avro_value_schema_id` to the Connect schema (JsonConverter's form) its rows'
/// `envelope` payloads are typed by. `{"schema": <it>, "payload": <envelope>}` is then the
/// record exactly as JsonConverter would have written it.
pub const AVRO_CONNECT_SCHEMAS: &str = "cdc_lake.avro_connect_schemas";

/// The column of an Avro row's writer schema id (files with Avro changes only).
pub const AVRO_SCHEMA_ID: &str = "avro_value_schema_id";

/// Encodes events (all of one table and date, in offset order) as one Parquet object.
pub fn encode_parquet(events: &[Arc<ChangeEvent>], schema: &RowSchema) -> Result<Vec<u8>, String> {
    let (batch, metadata) = record_batch(events, schema)?;
    write_parquet(&batch, metadata)
}

/// What a lake file is written for.
#[derive(Debug, Clone, Copy)]
pub enum FileFor<'a> {
    /// The plain Parquet lake: the lake's own types.
    Parquet,
    /// A Delta table (with its current schema, once it has one): Delta's types, and a column
    /// the table types differently under a name of its own ([`super::delta::types`]).
    Delta(Option<&'a Schema>),
}

/// One lake file.
pub fn encode_file(
    events: &[Arc<ChangeEvent>],
    schema: &RowSchema,
    file_for: FileFor<'_>,
) -> Result<Vec<u8>, String> {
    let (batch, metadata) = record_batch(events, schema)?;
    match file_for {
        FileFor::Parquet => write_parquet(&batch, metadata),
        FileFor::Delta(table) => {
            let mut batch = super::delta::types::to_delta(&batch).map_err(|e| e.to_string())?;
            if let Some(table) = table {
                batch = super::delta::types::rename_conflicts(batch, table)
                    .map_err(|e| e.to_string())?;
            }
            write_parquet(&batch, metadata)
        }
    }
}

/// The rows of one lake file, and the file's key-value metadata.
pub fn record_batch(
    events: &[Arc<ChangeEvent>],
    schema: &RowSchema,
) -> Result<(RecordBatch, Option<Vec<KeyValue>>), String> {
    let n = events.len();
    // Sized up front: the envelope column alone holds every record as received, and growing
    // it by doubling copied it about twice over.
    let total = |len: fn(&ChangeEvent) -> usize| events.iter().map(|e| len(e)).sum::<usize>();
    let mut topic = StringBuilder::with_capacity(n, total(|e| e.coords.topic.len()));
    let mut partition = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut kts = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut key =
        StringBuilder::with_capacity(n, total(|e| e.raw_key.as_ref().map_or(0, |k| k.len())));
    let mut op = StringBuilder::with_capacity(n, n);
    let mut ts_ms = Int64Builder::with_capacity(n);
    let mut transaction = StringBuilder::new();
    let mut envelope = StringBuilder::with_capacity(n, total(|e| e.raw_value.len()));
    let (
        mut s_connector,
        mut s_name,
        mut s_db,
        mut s_schema,
        mut s_table,
        mut s_snapshot,
        mut s_seq,
    ) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut s_ts, mut s_tx, mut s_lsn, mut s_commit) = (
        Int64Builder::new(),
        Int64Builder::new(),
        Int64Builder::new(),
        Int64Builder::new(),
    );
    for e in events {
        topic.append_value(&e.coords.topic);
        partition.append_value(e.coords.partition);
        offset.append_value(e.coords.offset);
        kts.append_option(e.coords.timestamp_ms);
        key.append_option(e.raw_key.as_deref());
        op.append_value(e.op.code());
        ts_ms.append_option(e.ts_ms);
        transaction.append_option(e.transaction.as_ref().map(|t| t.get()));
        envelope.append_value(&*e.raw_value);
        s_connector.append_option(e.source.connector.as_deref());
        s_name.append_option(e.source.name.as_deref());
        s_db.append_option(e.source.db.as_deref());
        s_schema.append_value(&e.table.schema);
        s_table.append_value(&e.table.table);
        s_snapshot.append_option(e.source.snapshot.as_deref());
        s_seq.append_option(e.source.sequence.as_deref());
        s_ts.append_option(e.source.ts_ms);
        s_tx.append_option(e.source.tx_id);
        s_lsn.append_option(e.source.lsn);
        s_commit.append_value(e.position.commit_lsn);
    }
    let source_fields = Fields::from(vec![
        Field::new("connector", DataType::Utf8, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("db", DataType::Utf8, true),
        Field::new("schema", DataType::Utf8, true),
        Field::new("table", DataType::Utf8, true),
        Field::new("ts_ms", DataType::Int64, true),
        Field::new("snapshot", DataType::Utf8, true),
        Field::new("tx_id", DataType::Int64, true),
        Field::new("lsn", DataType::Int64, true),
        Field::new("sequence", DataType::Utf8, true),
        Field::new("commit_lsn", DataType::Int64, true),
    ]);
    let source = StructArray::new(
        source_fields.clone(),
        vec![
            Arc::new(s_connector.finish()),
            Arc::new(s_name.finish()),
            Arc::new(s_db.finish()),
            Arc::new(s_schema.finish()),
            Arc::new(s_table.finish()),
            Arc::new(s_ts.finish()),
            Arc::new(s_snapshot.finish()),
            Arc::new(s_tx.finish()),
            Arc::new(s_lsn.finish()),
            Arc::new(s_seq.finish()),
            Arc::new(s_commit.finish()),
        ],
        None,
    );
    let befores: Vec<_> = events.iter().map(|e| e.before.as_ref()).collect();
    let afters: Vec<_> = events.iter().map(|e| e.after.as_ref()).collect();
    let (before, row_fields) = row_struct(schema, &befores);
    let (after, _) = row_struct(schema, &afters);

    // Parquet cannot store a struct without fields: a file of rowless changes only (say a
    // schemaless truncate) has no before/after columns; its envelope column says everything.
    let has_rows = !row_fields.is_empty();
    let mut fields = vec![
        Field::new("kafka_topic", DataType::Utf8, false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
        Field::new(
            "kafka_timestamp",
            DataType::Timestamp(ArrowUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("kafka_key", DataType::Utf8, true),
        Field::new("op", DataType::Utf8, false),
        Field::new("ts_ms", DataType::Int64, true),
        Field::new("source", DataType::Struct(source_fields), false),
    ];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(topic.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(kts.finish()),
        Arc::new(key.finish()),
        Arc::new(op.finish()),
        Arc::new(ts_ms.finish()),
        Arc::new(source),
    ];
    if has_rows {
        fields.push(Field::new(
            "before",
            DataType::Struct(row_fields.clone()),
            true,
        ));
        fields.push(Field::new("after", DataType::Struct(row_fields), true));
        columns.push(before);
        columns.push(after);
    }
    fields.push(Field::new("transaction", DataType::Utf8, true));
    fields.push(Field::new("envelope", DataType::Utf8, false));
    columns.push(Arc::new(transaction.finish()));
    columns.push(Arc::new(envelope.finish()));
    // Changes that arrived as Avro keep their value bytes and writer schema id, so the record
    // as published is recoverable. Their `envelope` is the JSON payload; the Connect schema of
    // each writer schema is stored once, in the file's metadata, not once per row. Files of
    // JSON changes have none of this.
    let mut avro_schemas: BTreeMap<u32, &WriterSchema> = BTreeMap::new();
    if events.iter().any(|e| e.avro.is_some()) {
        let mut bytes = BinaryBuilder::new();
        let mut schema_id = Int64Builder::with_capacity(n);
        for e in events {
            let avro = e.avro.as_deref();
            bytes.append_option(avro.map(|a| a.value.as_slice()));
            schema_id.append_option(avro.map(|a| i64::from(a.value_schema.id())));
            if let Some(a) = avro {
                avro_schemas.insert(a.value_schema.id(), &a.value_schema);
            }
        }
        fields.push(Field::new("avro_value", DataType::Binary, true));
        fields.push(Field::new(AVRO_SCHEMA_ID, DataType::Int64, true));
        columns.push(Arc::new(bytes.finish()));
        columns.push(Arc::new(schema_id.finish()));
    }
    let arrow_schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(arrow_schema.clone(), columns).map_err(|e| e.to_string())?;
    let metadata = (!avro_schemas.is_empty()).then(|| {
        let entries: Vec<String> = avro_schemas
            .iter()
            .map(|(id, w)| format!("\"{id}\":{}", w.connect_text()))
            .collect();
        vec![KeyValue::new(
            AVRO_CONNECT_SCHEMAS.to_string(),
            format!("{{{}}}", entries.join(",")),
        )]
    });
    Ok((batch, metadata))
}

/// How every lake file is written (compacted files too).
pub fn writer_properties(metadata: Option<Vec<KeyValue>>) -> WriterProperties {
    let mut builder = WriterProperties::builder();
    // Columns whose every value differs: a dictionary cannot shrink them, and building one
    // (hashing every record as received) cost the lake several percent of its time before
    // the writer gave up on it.
    for column in ["kafka_offset", "envelope", "avro_value"] {
        builder = builder.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    builder
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("cdc-lake {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(metadata)
        .build()
}

/// One Parquet object of `batch`.
pub fn write_parquet(
    batch: &RecordBatch,
    metadata: Option<Vec<KeyValue>>,
) -> Result<Vec<u8>, String> {
    let props = writer_properties(metadata);
    let mut buf = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).map_err(|e| e.to_string())?;
    writer.write(batch).map_err(|e| e.to_string())?;
    writer.close().map_err(|e| e.to_string())?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::KafkaCoordinates;
    use crate::envelope::{Decoded, Decoder};

    /// A schemaless truncate has no row, so its file has no before/after columns (Parquet
    /// cannot store an empty struct; this once stalled the lake sink in a retry loop).
    #[test]
    fn a_file_of_rowless_changes_encodes() {
        let truncate = r#"{"before":null,"after":null,"source":{"name":"p","ts_ms":1,"db":"d","sequence":"[\"10\",\"12\"]","schema":"public","table":"t","txId":1,"lsn":12},"op":"t","ts_ms":2}"#;
        let coords = KafkaCoordinates {
            topic: "p.public.t".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: Some(1),
        };
        let Decoded::Change(e) = Decoder::new().decode(coords, None, Some(truncate.as_bytes()))
        else {
            panic!("a truncate decodes to a change");
        };
        assert!(e.schema.columns.is_empty());
        let bytes = encode_parquet(std::slice::from_ref(&e), &e.schema).unwrap();
        let reader =
            parquet::file::reader::SerializedFileReader::new(bytes::Bytes::from(bytes)).unwrap();
        use parquet::file::reader::FileReader;
        let names: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert!(names.contains(&"envelope".to_string()) && !names.contains(&"after".to_string()));
    }

    /// Each value lands in its own column when rows list their columns in another order than
    /// the file's schema, lack some, or carry a column the first row did not have; the
    /// dictionary-less columns read back whole.
    #[test]
    fn values_land_in_their_columns_whatever_the_key_order() {
        let mut decoder = Decoder::new();
        let afters = [
            r#"{"id":1,"v":"a","n":1.5}"#,
            r#"{"v":"b","id":2,"n":2.5}"#,
            r#"{"id":3,"w":7}"#,
            r#"{"n":4.5,"w":8,"v":"d","id":4}"#,
        ];
        let events: Vec<Arc<ChangeEvent>> = afters
            .iter()
            .enumerate()
            .map(|(offset, after)| {
                let value = format!(
                    r#"{{"before":null,"after":{after},"source":{{"schema":"public","table":"t","lsn":{offset}}},"op":"c"}}"#
                );
                let coords = KafkaCoordinates {
                    topic: "t".into(),
                    partition: 0,
                    offset: offset as i64,
                    timestamp_ms: None,
                };
                match decoder.decode(coords, None, Some(value.as_bytes())) {
                    Decoded::Change(e) => e,
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        let mut schema = RowSchema::default();
        for e in &events {
            schema.merge(&e.schema);
        }
        let (batch, _) = record_batch(&events, &schema).unwrap();
        let after = batch
            .column_by_name("after")
            .unwrap()
            .as_any()
            .downcast_ref::<StructArray>()
            .unwrap();
        let types: Vec<(&str, &DataType)> = after
            .fields()
            .iter()
            .map(|f| (f.name().as_str(), f.data_type()))
            .collect();
        assert_eq!(
            types,
            [
                ("id", &DataType::Int64),
                ("v", &DataType::Utf8),
                ("n", &DataType::Float64),
                ("w", &DataType::Int64)
            ],
            "each column keeps its inferred type"
        );
        let column = |name: &str| {
            let array = after.column_by_name(name).unwrap();
            (0..array.len())
                .map(|i| {
                    (!array.is_null(i))
                        .then(|| arrow::util::display::array_value_to_string(array, i).unwrap())
                })
                .collect::<Vec<_>>()
        };
        let some = |v: &[&str]| -> Vec<Option<String>> {
            v.iter()
                .map(|s| (!s.is_empty()).then(|| s.to_string()))
                .collect()
        };
        assert_eq!(column("id"), some(&["1", "2", "3", "4"]));
        assert_eq!(column("v"), some(&["a", "b", "", "d"]));
        assert_eq!(column("n"), some(&["1.5", "2.5", "", "4.5"]));
        assert_eq!(column("w"), some(&["", "", "7", "8"]));

        let bytes = write_parquet(&batch, None).unwrap();
        let read: Vec<RecordBatch> =
            parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
                bytes::Bytes::from(bytes),
                1024,
            )
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(read, vec![batch]);
    }
}
