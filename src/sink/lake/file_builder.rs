//! A lake file being filled: the changes of one table and date as Arrow columns, appended as
//! each change reaches the lake. The lake then holds a change as its column values (about its
//! wire size) rather than as its parsed maps (several times that) until the file rolls, and
//! the event itself is freed as soon as every sink is done with its batch.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayBuilder, ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, StringBuilder,
    StructArray, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, TimeUnit as ArrowUnit};
use arrow::record_batch::RecordBatch;
use parquet::file::metadata::KeyValue;

use super::columns::{join_pieces, RowColumns, INITIAL_ROWS};
use crate::envelope::avro::WriterSchema;
use crate::envelope::{ChangeEvent, RowSchema};

/// The file metadata key of an Avro file's Connect schemas: a JSON object from each writer
/// schema id in `avro_value_schema_id` to the Connect schema (JsonConverter's form) its rows'
/// `envelope` payloads are typed by. `{"schema": <it>, "payload": <envelope>}` is then the
/// record exactly as JsonConverter would have written it.
pub const AVRO_CONNECT_SCHEMAS: &str = "cdc_lake.avro_connect_schemas";

/// The column of an Avro row's writer schema id (files with Avro changes only).
pub const AVRO_SCHEMA_ID: &str = "avro_value_schema_id";

/// A column of a fixed type: the rows finished so far, and a builder for the rows since.
/// Finishing keeps the result, so a commit that fails and is retried encodes the same rows.
struct Kept<B> {
    done: Vec<ArrayRef>,
    open: B,
}

impl<B: ArrayBuilder> Kept<B> {
    fn new(open: B) -> Self {
        Self {
            done: Vec::new(),
            open,
        }
    }

    fn finish(&mut self) -> Result<ArrayRef, String> {
        let fresh = self.open.finish();
        let ty = fresh.data_type().clone();
        join_pieces(&mut self.done, fresh, &ty)
    }
}

fn text() -> Kept<StringBuilder> {
    Kept::new(StringBuilder::with_capacity(INITIAL_ROWS, 0))
}

fn int64() -> Kept<Int64Builder> {
    Kept::new(Int64Builder::with_capacity(INITIAL_ROWS))
}

/// The `source` block's columns.
struct SourceColumns {
    connector: Kept<StringBuilder>,
    name: Kept<StringBuilder>,
    db: Kept<StringBuilder>,
    schema: Kept<StringBuilder>,
    table: Kept<StringBuilder>,
    ts_ms: Kept<Int64Builder>,
    snapshot: Kept<StringBuilder>,
    tx_id: Kept<Int64Builder>,
    lsn: Kept<Int64Builder>,
    sequence: Kept<StringBuilder>,
    commit_lsn: Kept<Int64Builder>,
}

impl SourceColumns {
    fn new() -> Self {
        Self {
            connector: text(),
            name: text(),
            db: text(),
            schema: text(),
            table: text(),
            ts_ms: int64(),
            snapshot: text(),
            tx_id: int64(),
            lsn: int64(),
            sequence: text(),
            commit_lsn: int64(),
        }
    }

    fn push(&mut self, e: &ChangeEvent) {
        self.connector
            .open
            .append_option(e.source.connector.as_deref());
        self.name.open.append_option(e.source.name.as_deref());
        self.db.open.append_option(e.source.db.as_deref());
        self.schema.open.append_value(&e.table.schema);
        self.table.open.append_value(&e.table.table);
        self.ts_ms.open.append_option(e.source.ts_ms);
        self.snapshot
            .open
            .append_option(e.source.snapshot.as_deref());
        self.tx_id.open.append_option(e.source.tx_id);
        self.lsn.open.append_option(e.source.lsn);
        self.sequence
            .open
            .append_option(e.source.sequence.as_deref());
        self.commit_lsn.open.append_value(e.position.commit_lsn);
    }

    fn finish(&mut self) -> Result<StructArray, String> {
        let utf8 = |name| Field::new(name, DataType::Utf8, true);
        let int64 = |name| Field::new(name, DataType::Int64, true);
        let fields = Fields::from(vec![
            utf8("connector"),
            utf8("name"),
            utf8("db"),
            utf8("schema"),
            utf8("table"),
            int64("ts_ms"),
            utf8("snapshot"),
            int64("tx_id"),
            int64("lsn"),
            utf8("sequence"),
            int64("commit_lsn"),
        ]);
        let columns = vec![
            self.connector.finish()?,
            self.name.finish()?,
            self.db.finish()?,
            self.schema.finish()?,
            self.table.finish()?,
            self.ts_ms.finish()?,
            self.snapshot.finish()?,
            self.tx_id.finish()?,
            self.lsn.finish()?,
            self.sequence.finish()?,
            self.commit_lsn.finish()?,
        ];
        StructArray::try_new(fields, columns, None).map_err(|e| e.to_string())
    }
}

/// The columns of changes that arrived as Avro: their value bytes and writer schema id, so the
/// record as published is recoverable. Files of JSON changes have none of this.
struct AvroColumns {
    value: Kept<BinaryBuilder>,
    schema_id: Kept<Int64Builder>,
    /// The Connect schema of each writer schema, stored once in the file's metadata.
    schemas: BTreeMap<u32, Arc<WriterSchema>>,
}

/// The rows of one lake file, appended a change at a time.
pub struct FileBuilder {
    /// The file's row schema: every change's merged in (columns added, types widened).
    schema: RowSchema,
    /// The schema of the last change, which the next one usually shares.
    last_schema: Option<Arc<RowSchema>>,
    /// The source table as the raw log names it (`source_table`), which prune and replay
    /// match against.
    table: String,
    first_offset: i64,
    last_offset: i64,
    topic: Kept<StringBuilder>,
    partition: Kept<Int32Builder>,
    offset: Kept<Int64Builder>,
    kafka_timestamp: Kept<TimestampMillisecondBuilder>,
    key: Kept<StringBuilder>,
    op: Kept<StringBuilder>,
    ts_ms: Kept<Int64Builder>,
    source: SourceColumns,
    before: RowColumns,
    after: RowColumns,
    transaction: Kept<StringBuilder>,
    envelope: Kept<StringBuilder>,
    avro: Option<AvroColumns>,
}

impl FileBuilder {
    /// A file whose first change is `first`.
    pub fn new(first: &ChangeEvent) -> Self {
        let mut file = Self {
            schema: RowSchema::default(),
            last_schema: None,
            table: first.table.to_string(),
            first_offset: first.coords.offset,
            last_offset: first.coords.offset,
            topic: text(),
            partition: Kept::new(Int32Builder::with_capacity(INITIAL_ROWS)),
            offset: int64(),
            kafka_timestamp: Kept::new(
                TimestampMillisecondBuilder::with_capacity(INITIAL_ROWS).with_timezone("UTC"),
            ),
            key: text(),
            op: text(),
            ts_ms: int64(),
            source: SourceColumns::new(),
            before: RowColumns::default(),
            after: RowColumns::default(),
            transaction: text(),
            envelope: text(),
            avro: None,
        };
        file.push(first);
        file
    }

    /// The rows of `events` (all of one table and date, in offset order).
    pub fn of(events: &[Arc<ChangeEvent>]) -> Option<Self> {
        let (first, rest) = events.split_first()?;
        let mut file = Self::new(first);
        for e in rest {
            file.push(e);
        }
        Some(file)
    }

    pub fn rows(&self) -> usize {
        self.offset.done.iter().map(|d| d.len()).sum::<usize>() + self.offset.open.len()
    }

    pub fn first_offset(&self) -> i64 {
        self.first_offset
    }

    pub fn last_offset(&self) -> i64 {
        self.last_offset
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The file's row schema so far.
    pub fn schema(&self) -> &RowSchema {
        &self.schema
    }

    /// Whether `schema` is the last change's (then it is already merged in).
    pub fn has_schema_of_last(&self, schema: &Arc<RowSchema>) -> bool {
        self.last_schema
            .as_ref()
            .is_some_and(|last| Arc::ptr_eq(last, schema))
    }

    /// Appends one change.
    pub fn push(&mut self, e: &ChangeEvent) {
        if !self.has_schema_of_last(&e.schema) {
            if self.schema.merge(&e.schema) {
                self.before.fit(&self.schema);
                self.after.fit(&self.schema);
            }
            self.last_schema = Some(e.schema.clone());
        }
        let avro = e.avro.as_deref();
        if avro.is_some() && self.avro.is_none() {
            // The first Avro change of the file: the rows before it have no Avro value.
            let rows_before = self.rows();
            let mut value = Kept::new(BinaryBuilder::with_capacity(INITIAL_ROWS, 0));
            let mut schema_id = int64();
            value.open.append_nulls(rows_before);
            schema_id.open.append_nulls(rows_before);
            self.avro = Some(AvroColumns {
                value,
                schema_id,
                schemas: BTreeMap::new(),
            });
        }
        self.last_offset = e.coords.offset;
        self.topic.open.append_value(&e.coords.topic);
        self.partition.open.append_value(e.coords.partition);
        self.offset.open.append_value(e.coords.offset);
        self.kafka_timestamp
            .open
            .append_option(e.coords.timestamp_ms);
        self.key.open.append_option(e.raw_key.as_deref());
        self.op.open.append_value(e.op.code());
        self.ts_ms.open.append_option(e.ts_ms);
        self.source.push(e);
        self.before.push(&self.schema, e.before.as_ref());
        self.after.push(&self.schema, e.after.as_ref());
        self.transaction
            .open
            .append_option(e.transaction.as_ref().map(|t| t.get()));
        self.envelope.open.append_value(&*e.raw_value);
        if let Some(columns) = self.avro.as_mut() {
            columns
                .value
                .open
                .append_option(avro.map(|a| a.value.as_slice()));
            columns
                .schema_id
                .open
                .append_option(avro.map(|a| i64::from(a.value_schema.id())));
            if let Some(a) = avro {
                columns
                    .schemas
                    .entry(a.value_schema.id())
                    .or_insert_with(|| a.value_schema.clone());
            }
        }
    }

    /// Every row so far as one record batch, and the file's key-value metadata. The rows stay
    /// in the builder, so a failed commit can be retried.
    pub fn finish(&mut self) -> Result<(RecordBatch, Option<Vec<KeyValue>>), String> {
        let (before, row_fields) = self.before.finish(&self.schema)?;
        let (after, _) = self.after.finish(&self.schema)?;
        let source = self.source.finish()?;
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
            Field::new("source", DataType::Struct(source.fields().clone()), false),
        ];
        let mut columns: Vec<ArrayRef> = vec![
            self.topic.finish()?,
            self.partition.finish()?,
            self.offset.finish()?,
            self.kafka_timestamp.finish()?,
            self.key.finish()?,
            self.op.finish()?,
            self.ts_ms.finish()?,
            Arc::new(source),
        ];
        // Parquet cannot store a struct without fields: a file of rowless changes only (say a
        // schemaless truncate) has no before/after columns; its envelope column says everything.
        if !row_fields.is_empty() {
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
        columns.push(self.transaction.finish()?);
        columns.push(self.envelope.finish()?);
        let mut metadata = None;
        if let Some(avro) = self.avro.as_mut() {
            fields.push(Field::new("avro_value", DataType::Binary, true));
            fields.push(Field::new(AVRO_SCHEMA_ID, DataType::Int64, true));
            columns.push(avro.value.finish()?);
            columns.push(avro.schema_id.finish()?);
            // `{"schema": <it>, "payload": <envelope>}` is the record exactly as
            // JsonConverter would have written it.
            let entries: Vec<String> = avro
                .schemas
                .iter()
                .map(|(id, w)| format!("\"{id}\":{}", w.connect_text()))
                .collect();
            metadata = Some(vec![KeyValue::new(
                AVRO_CONNECT_SCHEMAS.to_string(),
                format!("{{{}}}", entries.join(",")),
            )]);
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map_err(|e| e.to_string())?;
        Ok((batch, metadata))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use arrow::array::{Decimal256Array, Float64Array, Int64Array, StringArray, StructArray};
    use arrow::datatypes::i256;

    use super::*;
    use crate::domain::KafkaCoordinates;
    use crate::envelope::{Decoded, Decoder};

    /// Schemaless changes of table `t` with these `after` rows, at offsets 0, 1, ….
    pub(in crate::sink::lake) fn changes(afters: &[&str]) -> Vec<Arc<ChangeEvent>> {
        let mut decoder = Decoder::new();
        afters
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
            .collect()
    }

    fn after(batch: &RecordBatch) -> &StructArray {
        batch
            .column_by_name("after")
            .unwrap()
            .as_any()
            .downcast_ref::<StructArray>()
            .unwrap()
    }

    /// A column whose inferred type widens while the file fills (integer to float, integer to
    /// a wider integer and then to exact text, unknown to text) holds every row's value at the
    /// final type, as the JSON literals say, whatever type the row arrived under.
    #[test]
    fn a_column_that_widens_while_the_file_fills_holds_every_value_at_its_final_type() {
        let huge = format!("1{}", "0".repeat(79));
        let afters = [
            r#"{"n":1,"w":-5,"h":7,"u":null}"#.to_string(),
            r#"{"n":2.5,"w":123456789012345678901234567890,"h":-8,"u":null}"#.to_string(),
            format!(r#"{{"n":null,"w":6,"h":{huge},"u":"x"}}"#),
            r#"{"n":4,"w":null,"h":9,"u":"y"}"#.to_string(),
        ];
        let afters: Vec<&str> = afters.iter().map(String::as_str).collect();
        let events = changes(&afters);
        let (batch, _) = FileBuilder::of(&events).unwrap().finish().unwrap();
        let row = after(&batch);
        let n = row.column_by_name("n").unwrap();
        assert_eq!(
            n.as_any().downcast_ref::<Float64Array>(),
            Some(&Float64Array::from(vec![
                Some(1.0),
                Some(2.5),
                None,
                Some(4.0)
            ])),
            "integers and floats: float"
        );
        let w = row.column_by_name("w").unwrap();
        let wide = Decimal256Array::from(vec![
            Some(i256::from(-5)),
            Some(i256::from_string("123456789012345678901234567890").unwrap()),
            Some(i256::from(6)),
            None,
        ])
        .with_precision_and_scale(76, 0)
        .unwrap();
        assert_eq!(
            w.as_any().downcast_ref::<Decimal256Array>(),
            Some(&wide),
            "integers wider than i64: 76-digit decimals"
        );
        let h = row.column_by_name("h").unwrap();
        assert_eq!(
            h.as_any().downcast_ref::<StringArray>(),
            Some(&StringArray::from(vec![
                Some("7"),
                Some("-8"),
                Some(huge.as_str()),
                Some("9")
            ])),
            "integers wider than 76 digits: their exact text"
        );
        let u = row.column_by_name("u").unwrap();
        assert_eq!(
            u.as_any().downcast_ref::<StringArray>(),
            Some(&StringArray::from(vec![None, None, Some("x"), Some("y")])),
        );
    }

    /// A commit that fails is retried with the rows the builder kept, plus any that arrived
    /// since; a column first seen after the retry's first attempt is null in the rows before.
    #[test]
    fn finishing_keeps_the_rows_for_a_retry() {
        let events = changes(&[r#"{"id":1}"#, r#"{"id":2}"#, r#"{"id":3,"v":"c"}"#]);
        let mut file = FileBuilder::of(&events[..2]).unwrap();
        let (first, _) = file.finish().unwrap();
        assert_eq!(first.num_rows(), 2);
        let (again, _) = file.finish().unwrap();
        assert_eq!(again, first, "finishing twice gives the same rows");
        file.push(&events[2]);
        let (all, _) = file.finish().unwrap();
        assert_eq!(file.rows(), 3);
        assert_eq!((file.first_offset(), file.last_offset()), (0, 2));
        let offsets = all.column_by_name("kafka_offset").unwrap();
        assert_eq!(
            offsets.as_any().downcast_ref::<Int64Array>(),
            Some(&Int64Array::from(vec![0, 1, 2]))
        );
        let row = after(&all);
        assert_eq!(
            row.column_by_name("v")
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>(),
            Some(&StringArray::from(vec![None, None, Some("c")]))
        );
        assert_eq!(
            all.column_by_name("envelope").unwrap().len(),
            3,
            "every envelope kept"
        );
    }
}
