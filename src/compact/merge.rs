//! Merging a run of lake files into one Parquet file, rows in offset order, columns as
//! written: the rows are copied as Arrow batches, never decoded, so every value keeps its type.

use std::collections::BTreeMap;

use arrow::datatypes::Fields;
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use serde_json::{Map, Value};

use crate::sink::lake::encode::{writer_properties, AVRO_CONNECT_SCHEMAS};
use crate::sink::lake::manifest::FileEntry;

/// A row group is flushed at this much buffered data, so a merge's memory stays near the size
/// of the file it writes.
const ROW_GROUP_BYTES: usize = 64 << 20;

/// What a file must share with the others of a merge: its columns, and its metadata other than
/// the Avro schemas (which are merged).
#[derive(Debug, Clone, PartialEq)]
struct FileShape {
    fields: Fields,
    metadata: BTreeMap<String, Option<String>>,
}

/// The merge of consecutive files with one shape.
pub struct Merger {
    shape: FileShape,
    writer: ArrowWriter<Vec<u8>>,
    inputs: Vec<FileEntry>,
    rows: u64,
    avro_schemas: Map<String, Value>,
}

/// A merged file and the entries of the files it holds.
pub struct Merged {
    pub bytes: Vec<u8>,
    pub rows: u64,
    pub inputs: Vec<FileEntry>,
}

/// Where a file went.
pub enum Added {
    /// Into the open merge.
    Merged,
    /// Its shape differs: the finished merge of the files before it, and a new merge that
    /// starts with this file.
    Split(Box<Merger>),
}

/// An opened input file: its shape, its Avro schemas, and its rows to read.
struct Opened {
    shape: FileShape,
    avro_schemas: Map<String, Value>,
    builder: ParquetRecordBatchReaderBuilder<Bytes>,
}

fn open(entry: &FileEntry, bytes: Bytes) -> Result<Opened, String> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| format!("{} is not a readable Parquet file: {e}", entry.path))?;
    let mut metadata = BTreeMap::new();
    let mut avro = Map::new();
    for kv in builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .into_iter()
        .flatten()
    {
        match kv.key.as_str() {
            // The writer's own copy of the Arrow schema: each file gets a new one.
            "ARROW:schema" => {}
            AVRO_CONNECT_SCHEMAS => {
                let by_id: Map<String, Value> =
                    serde_json::from_str(kv.value.as_deref().unwrap_or("{}")).map_err(|e| {
                        format!(
                            "{}: {AVRO_CONNECT_SCHEMAS} is not a JSON object: {e}",
                            entry.path
                        )
                    })?;
                avro.extend(by_id);
            }
            key => {
                metadata.insert(key.to_string(), kv.value.clone());
            }
        }
    }
    let shape = FileShape {
        fields: builder.schema().fields().clone(),
        metadata,
    };
    Ok(Opened {
        shape,
        avro_schemas: avro,
        builder,
    })
}

impl Merger {
    /// A merge that starts with `entry`'s file.
    pub fn start(entry: &FileEntry, bytes: Bytes) -> Result<Self, String> {
        let Opened {
            shape,
            avro_schemas,
            builder,
        } = open(entry, bytes)?;
        let schema = builder.schema().clone();
        let metadata: Vec<KeyValue> = shape
            .metadata
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect();
        let props = writer_properties((!metadata.is_empty()).then_some(metadata));
        let writer = ArrowWriter::try_new(Vec::new(), schema, Some(props))
            .map_err(|e| format!("writing a compacted file: {e}"))?;
        let mut merger = Self {
            shape,
            writer,
            inputs: Vec::new(),
            rows: 0,
            avro_schemas,
        };
        merger.copy(entry, builder)?;
        Ok(merger)
    }

    /// Adds the next file of the run (offsets after every file added so far).
    pub fn add(&mut self, entry: &FileEntry, bytes: Bytes) -> Result<Added, String> {
        let last = self.inputs.last().expect("a merge starts with a file");
        if entry.min_offset <= last.max_offset {
            return Err(format!(
                "{} starts at offset {}, inside {} (up to {}): not merging out of order",
                entry.path, entry.min_offset, last.path, last.max_offset
            ));
        }
        let opened = open(entry, bytes.clone())?;
        if opened.shape != self.shape {
            return Ok(Added::Split(Box::new(Self::start(entry, bytes)?)));
        }
        self.avro_schemas.extend(opened.avro_schemas);
        self.copy(entry, opened.builder)?;
        Ok(Added::Merged)
    }

    fn copy(
        &mut self,
        entry: &FileEntry,
        builder: ParquetRecordBatchReaderBuilder<Bytes>,
    ) -> Result<(), String> {
        let reader = builder
            .build()
            .map_err(|e| format!("reading {}: {e}", entry.path))?;
        let mut rows = 0u64;
        for batch in reader {
            let batch = batch.map_err(|e| format!("reading {}: {e}", entry.path))?;
            rows += batch.num_rows() as u64;
            self.writer
                .write(&batch)
                .map_err(|e| format!("writing a compacted file: {e}"))?;
            if self.writer.in_progress_size() >= ROW_GROUP_BYTES {
                self.writer
                    .flush()
                    .map_err(|e| format!("writing a compacted file: {e}"))?;
            }
        }
        if rows != entry.rows {
            return Err(format!(
                "{} holds {rows} rows, the manifest says {}: not compacting it",
                entry.path, entry.rows
            ));
        }
        self.rows += rows;
        self.inputs.push(entry.clone());
        Ok(())
    }

    pub fn files(&self) -> usize {
        self.inputs.len()
    }

    pub fn finish(mut self) -> Result<Merged, String> {
        if !self.avro_schemas.is_empty() {
            self.writer.append_key_value_metadata(KeyValue::new(
                AVRO_CONNECT_SCHEMAS.to_string(),
                Value::Object(std::mem::take(&mut self.avro_schemas)).to_string(),
            ));
        }
        let bytes = self
            .writer
            .into_inner()
            .map_err(|e| format!("writing a compacted file: {e}"))?;
        Ok(Merged {
            bytes,
            rows: self.rows,
            inputs: self.inputs,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    use super::*;

    fn file(first: i64, columns: &[&str], avro: Option<&str>) -> (FileEntry, Bytes) {
        let mut fields = vec![Field::new("kafka_offset", DataType::Int64, false)];
        let mut arrays: Vec<Arc<dyn Array>> =
            vec![Arc::new(Int64Array::from(vec![first, first + 1]))];
        for c in columns {
            fields.push(Field::new(*c, DataType::Utf8, true));
            arrays.push(Arc::new(StringArray::from(vec![Some("x"), None])));
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap();
        let metadata =
            avro.map(|a| vec![KeyValue::new(AVRO_CONNECT_SCHEMAS.into(), a.to_string())]);
        let bytes = crate::sink::lake::encode::write_parquet(&batch, metadata).unwrap();
        let entry = FileEntry {
            path: format!("f{first}"),
            table: "public.orders".into(),
            date: "2026-11-30".into(),
            rows: 2,
            bytes: bytes.len() as u64,
            min_offset: first,
            max_offset: first + 1,
        };
        (entry, Bytes::from(bytes))
    }

    fn offsets_and_avro(bytes: Vec<u8>) -> (Vec<i64>, Option<String>) {
        let builder = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes)).unwrap();
        let avro = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|e| e.key == AVRO_CONNECT_SCHEMAS))
            .and_then(|e| e.value.clone());
        let mut offsets = Vec::new();
        for b in builder.build().unwrap() {
            let b = b.unwrap();
            offsets.extend(b.column(0).as_primitive::<Int64Type>().values().iter());
        }
        (offsets, avro)
    }

    #[test]
    fn files_of_one_shape_merge_in_order_with_their_avro_schemas() {
        let (a, ab) = file(0, &["status"], Some(r#"{"1":{"type":"struct"}}"#));
        let (b, bb) = file(2, &["status"], Some(r#"{"2":{"type":"struct"}}"#));
        let mut m = Merger::start(&a, ab).unwrap();
        assert!(matches!(m.add(&b, bb).unwrap(), Added::Merged));
        let merged = m.finish().unwrap();
        assert_eq!(merged.rows, 4);
        assert_eq!(merged.inputs, [a, b]);
        let (offsets, avro) = offsets_and_avro(merged.bytes);
        assert_eq!(offsets, [0, 1, 2, 3]);
        let avro: Value = serde_json::from_str(&avro.unwrap()).unwrap();
        assert_eq!(
            avro,
            serde_json::json!({"1": {"type": "struct"}, "2": {"type": "struct"}})
        );
    }

    #[test]
    fn a_new_column_splits_the_merge_and_offsets_must_increase() {
        let (a, ab) = file(0, &["status"], None);
        let (b, bb) = file(2, &["status", "note"], None);
        let mut m = Merger::start(&a, ab.clone()).unwrap();
        match m.add(&b, bb).unwrap() {
            Added::Split(next) => assert_eq!(next.files(), 1),
            Added::Merged => panic!("files with different columns merged"),
        }
        let err = m.add(&a, ab).err().expect("the same offsets again");
        assert!(err.contains("out of order"), "{err}");
    }

    #[test]
    fn a_row_count_unlike_the_manifest_refuses_the_file() {
        let (mut a, ab) = file(0, &[], None);
        a.rows = 3;
        let err = Merger::start(&a, ab).err().unwrap();
        assert!(err.contains("manifest says 3"), "{err}");
    }
}
