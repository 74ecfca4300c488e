//! Encodes one lake file: change events of one table, one date and one offset range, as Parquet
//! with `before`/`after` as typed structs and the original envelope kept for losslessness.

use std::sync::Arc;

use arrow::datatypes::Schema;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::file_builder::FileBuilder;
pub use super::file_builder::{AVRO_CONNECT_SCHEMAS, AVRO_SCHEMA_ID};
use crate::envelope::ChangeEvent;

/// Encodes events (all of one table and date, in offset order) as one Parquet object.
pub fn encode_parquet(events: &[Arc<ChangeEvent>]) -> Result<Vec<u8>, String> {
    let (batch, metadata) = record_batch(events)?;
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

/// One lake file of the rows in `batch` ([`FileBuilder::finish`]).
pub fn encode_file(
    batch: &RecordBatch,
    metadata: Option<Vec<KeyValue>>,
    file_for: FileFor<'_>,
) -> Result<Vec<u8>, String> {
    match file_for {
        FileFor::Parquet => write_parquet(batch, metadata),
        FileFor::Delta(table) => {
            let mut batch = super::delta::types::to_delta(batch).map_err(|e| e.to_string())?;
            if let Some(table) = table {
                batch = super::delta::types::rename_conflicts(batch, table)
                    .map_err(|e| e.to_string())?;
            }
            write_parquet(&batch, metadata)
        }
    }
}

/// The rows of one lake file of `events` (all of one table and date, in offset order), and
/// the file's key-value metadata; the row schema is every event's merged.
pub fn record_batch(
    events: &[Arc<ChangeEvent>],
) -> Result<(RecordBatch, Option<Vec<KeyValue>>), String> {
    match FileBuilder::of(events) {
        Some(mut file) => file.finish(),
        None => Err("a lake file needs at least one change".into()),
    }
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
    use arrow::array::StructArray;
    use arrow::datatypes::DataType;

    use super::super::file_builder::tests::changes;
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
        let bytes = encode_parquet(std::slice::from_ref(&e)).unwrap();
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
        let events = changes(&[
            r#"{"id":1,"v":"a","n":1.5}"#,
            r#"{"v":"b","id":2,"n":2.5}"#,
            r#"{"id":3,"w":7}"#,
            r#"{"n":4.5,"w":8,"v":"d","id":4}"#,
        ]);
        let (batch, _) = record_batch(&events).unwrap();
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
