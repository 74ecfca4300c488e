//! Reading a replay's changes from the lake: the manifest's commits, each commit's Parquet files
//! decoded again with the live decoder.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use arrow::array::RecordBatch;
use bytes::Bytes;
use object_store::ObjectStore;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::{spawn_reader, table_id, Chunks, Plan};
use crate::domain::{KafkaCoordinates, TopicPartition};
use crate::envelope::avro::json_converter_envelope;
use crate::envelope::{Decoded, Decoder};
use crate::replay::error::{Context, ReplayError, ReplayResult};
use crate::replay::Selection;
use crate::sink::lake::compaction::{ranges_with_files, read_partition};
use crate::sink::lake::encode::{AVRO_CONNECT_SCHEMAS, AVRO_SCHEMA_ID};
use crate::sink::lake::manifest::{Commit, Layout};

/// The topic-partitions the lake's manifest has commits for.
pub async fn lake_partitions(
    store: &dyn ObjectStore,
    prefix: &str,
) -> ReplayResult<Vec<TopicPartition>> {
    Ok(crate::sink::lake::lake_partitions(store, prefix).await?)
}

/// Offset ranges of the selection, per partition in offset order, with the current files
/// (compactions applied) that hold selected offsets: manifest commits, joined where a
/// compacted file spans several.
pub async fn lake_commits(
    store: &dyn ObjectStore,
    layout: &Layout,
    prefix: &str,
    sel: &Selection,
) -> ReplayResult<Vec<Commit>> {
    let mut out = Vec::new();
    for tp in lake_partitions(store, prefix).await? {
        if sel.topic.as_ref().is_some_and(|t| *t != tp.topic)
            || sel.partition.is_some_and(|p| p != tp.partition)
        {
            continue;
        }
        let partition = read_partition(store, layout, &tp)
            .await
            .with_context(|| format!("reading the lake manifest of {tp}"))?;
        for mut c in ranges_with_files(&partition.commits, &partition.files) {
            c.files.retain(|f| {
                f.max_offset >= sel.from_offset && sel.to_offset.is_none_or(|to| f.min_offset <= to)
            });
            if !c.files.is_empty() {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// Counts and ranges from the manifest alone (row counts are per file, so the offset filter is
/// approximate at the edges; the replay itself filters exactly).
pub fn plan_lake(commits: &[Commit]) -> Plan {
    let mut plan = Plan::default();
    for c in commits {
        let tp = TopicPartition::new(c.topic.clone(), c.partition);
        for f in &c.files {
            let e = plan
                .partitions
                .entry(tp.clone())
                .or_insert((f.min_offset, f.max_offset));
            e.0 = e.0.min(f.min_offset);
            e.1 = e.1.max(f.max_offset);
            plan.events += f.rows;
            plan.tables.insert(table_id(&f.table));
        }
    }
    plan
}

/// The lake columns a replay needs: coordinates, the key and the envelope as received.
const LAKE_COLUMNS: &[&str] = &[
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "kafka_timestamp",
    "kafka_key",
    "envelope",
];

/// One lake file being read: its record batches are decoded one at a time, so memory holds
/// one batch's changes rather than the file's. A compacted file can hold millions of changes;
/// decoded whole, 300k of them took a replay to 1.1 GB (docs/performance.md).
struct FileChanges {
    path: String,
    batches: ParquetRecordBatchReader,
    avro_schemas: HashMap<i64, Box<RawValue>>,
    /// Decoded changes of the current record batch, in file order.
    pending: VecDeque<Decoded>,
}

impl FileChanges {
    /// Opens a file whose record batches hold `batch_rows` rows.
    fn open(bytes: Bytes, path: &str, batch_rows: usize) -> ReplayResult<Self> {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .with_context(|| format!("{path} is not a readable Parquet file"))?;
        let avro_schemas = avro_connect_schemas(&builder, path)?;
        let fields = builder.parquet_schema();
        let position = |name: &str| {
            fields
                .root_schema()
                .get_fields()
                .iter()
                .position(|f| f.name() == name)
        };
        let mut indices: Vec<usize> = LAKE_COLUMNS
            .iter()
            .map(|name| position(name).with_context(|| format!("{path} has no column {name}")))
            .collect::<ReplayResult<_>>()?;
        if !avro_schemas.is_empty() {
            indices.push(
                position(AVRO_SCHEMA_ID)
                    .with_context(|| format!("{path} has Avro schemas but no {AVRO_SCHEMA_ID}"))?,
            );
        }
        let mask = ProjectionMask::roots(fields, indices);
        let batches = builder
            .with_projection(mask)
            .with_batch_size(batch_rows)
            .build()
            .with_context(|| format!("reading {path}"))?;
        Ok(Self {
            path: path.to_string(),
            batches,
            avro_schemas,
            pending: VecDeque::new(),
        })
    }

    /// The offset of the file's next change, decoding its next record batch when needed; None
    /// at the end of the file.
    fn next_offset(&mut self, decoder: &mut Decoder) -> ReplayResult<Option<i64>> {
        while self.pending.is_empty() {
            let Some(batch) = self.batches.next() else {
                return Ok(None);
            };
            let batch = batch.with_context(|| format!("reading {}", self.path))?;
            self.decode(&batch, decoder)?;
        }
        Ok(self.pending.front().map(|r| r.coords().offset))
    }

    /// Decodes one record batch's rows with the live decoder into `pending`.
    fn decode(&mut self, batch: &RecordBatch, decoder: &mut Decoder) -> ReplayResult<()> {
        use arrow::array::Array;
        use arrow::datatypes::{Int32Type, Int64Type};
        let (path, avro_schemas) = (self.path.as_str(), &self.avro_schemas);
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .with_context(|| format!("{path} has no column {name}"))
        };
        let topic = strings(col("kafka_topic")?, "kafka_topic", path)?;
        let partition = primitives::<Int32Type>(col("kafka_partition")?, "kafka_partition", path)?;
        let offset = primitives::<Int64Type>(col("kafka_offset")?, "kafka_offset", path)?;
        let ts = timestamps_ms(col("kafka_timestamp")?, path)?;
        let key = strings(col("kafka_key")?, "kafka_key", path)?;
        let envelope = strings(col("envelope")?, "envelope", path)?;
        let schema_ids = match avro_schemas.is_empty() {
            true => None,
            false => Some(primitives::<Int64Type>(
                col(AVRO_SCHEMA_ID)?,
                AVRO_SCHEMA_ID,
                path,
            )?),
        };
        for i in 0..batch.num_rows() {
            let coords = KafkaCoordinates {
                topic: topic.value(i).to_string(),
                partition: partition.value(i),
                offset: offset.value(i),
                timestamp_ms: ts.is_valid(i).then(|| ts.value(i)),
            };
            let k = key.is_valid(i).then(|| key.value(i).as_bytes());
            // An Avro row's envelope is its payload: with its Connect schema it is the record
            // as JsonConverter writes it, typed as the live pod typed it.
            let connect = schema_ids
                .as_ref()
                .filter(|ids| ids.is_valid(i))
                .and_then(|ids| avro_schemas.get(&ids.value(i)));
            let value = match connect {
                Some(schema) => {
                    Cow::Owned(json_converter_envelope(schema.get(), envelope.value(i)))
                }
                None => Cow::Borrowed(envelope.value(i)),
            };
            self.pending
                .push_back(decoder.decode(coords, k, Some(value.as_bytes())));
        }
        Ok(())
    }
}

fn strings<'a>(
    array: &'a arrow::array::ArrayRef,
    name: &str,
    path: &str,
) -> ReplayResult<&'a arrow::array::StringArray> {
    use arrow::array::AsArray;
    array
        .as_string_opt::<i32>()
        .with_context(|| format!("{path}: column {name} is {}, not Utf8", array.data_type()))
}

fn primitives<'a, T: arrow::datatypes::ArrowPrimitiveType>(
    array: &'a arrow::array::ArrayRef,
    name: &str,
    path: &str,
) -> ReplayResult<&'a arrow::array::PrimitiveArray<T>> {
    use arrow::array::AsArray;
    array.as_primitive_opt::<T>().with_context(|| {
        format!(
            "{path}: column {name} is {}, not {}",
            array.data_type(),
            T::DATA_TYPE
        )
    })
}

/// `kafka_timestamp` in milliseconds. Parquet-format lakes store milliseconds; Delta tables
/// hold only microseconds, so a Delta-format lake stores the same instants as microseconds.
fn timestamps_ms(
    array: &arrow::array::ArrayRef,
    path: &str,
) -> ReplayResult<arrow::array::TimestampMillisecondArray> {
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
    match array.data_type() {
        DataType::Timestamp(_, _) => {
            let ms = arrow::compute::cast(array, &DataType::Timestamp(TimeUnit::Millisecond, None))
                .with_context(|| format!("{path}: converting kafka_timestamp to milliseconds"))?;
            Ok(ms.as_primitive::<TimestampMillisecondType>().clone())
        }
        other => Err(ReplayError::Corrupt(format!(
            "{path}: column kafka_timestamp is {other}, not a timestamp"
        ))),
    }
}

/// The Connect schema of each writer schema id a lake file's Avro rows name (from the file's
/// metadata; none for files of JSON changes, and for Avro files written before the schemas were
/// kept there, whose envelopes hold the schema themselves).
fn avro_connect_schemas<T>(
    builder: &parquet::arrow::arrow_reader::ArrowReaderBuilder<T>,
    path: &str,
) -> ReplayResult<HashMap<i64, Box<RawValue>>> {
    let Some(text) = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|e| e.key == AVRO_CONNECT_SCHEMAS))
        .and_then(|e| e.value.as_deref())
    else {
        return Ok(HashMap::new());
    };
    let by_id: HashMap<String, Box<RawValue>> = serde_json::from_str(text)
        .with_context(|| format!("{path}: {AVRO_CONNECT_SCHEMAS} is not a JSON object"))?;
    by_id
        .into_iter()
        .map(|(id, schema)| {
            let id = id.parse::<i64>().ok().with_context(|| {
                format!("{path}: {AVRO_CONNECT_SCHEMAS} has a key that is no schema id: {id:?}")
            })?;
            Ok((id, schema))
        })
        .collect()
}

/// Changes per chunk sent to the apply: what a replay from the lake holds in flight is a few
/// chunks, whatever the size of the files.
pub const LAKE_CHUNK: usize = 5_000;

/// Streams the selected commits' records, commit by commit in offset order, in chunks of
/// [`LAKE_CHUNK`].
pub fn read_lake(store: Arc<dyn ObjectStore>, commits: Vec<Commit>, sel: Selection) -> Chunks {
    let (tx, rx) = mpsc::channel(2);
    spawn_reader(tx.clone(), async move {
        let mut decoder = Decoder::new();
        let mut chunk = Vec::with_capacity(LAKE_CHUNK);
        for commit in commits {
            let result = async {
                let mut files = Vec::with_capacity(commit.files.len());
                // Each file holds one decoded record batch while the commit is merged: a commit
                // of many tables' files (compacted, a thousand tables) would otherwise hold a
                // thousand batches of 1,024 changes.
                let batch_rows = (LAKE_CHUNK / commit.files.len().max(1)).clamp(16, 1024);
                for f in &commit.files {
                    let path = crate::sink::lake::manifest::stored_path(&f.path);
                    let bytes = store
                        .get(&path)
                        .await
                        .with_context(|| format!("reading lake file {path}"))?
                        .bytes()
                        .await
                        .with_context(|| format!("reading lake file {path}"))?;
                    files.push(FileChanges::open(bytes, &f.path, batch_rows)?);
                }
                // A commit's files split one offset range by table: merged back in offset
                // order, the smallest next offset first.
                let mut next = BinaryHeap::new();
                for (i, file) in files.iter_mut().enumerate() {
                    if let Some(offset) = file.next_offset(&mut decoder)? {
                        next.push(Reverse((offset, i)));
                    }
                }
                while let Some(Reverse((_, i))) = next.pop() {
                    let change = files[i].pending.pop_front().expect("its offset was read");
                    if let Some(offset) = files[i].next_offset(&mut decoder)? {
                        next.push(Reverse((offset, i)));
                    }
                    if !sel.selects(&change) {
                        continue;
                    }
                    chunk.push(change);
                    if chunk.len() == LAKE_CHUNK {
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(LAKE_CHUNK));
                        if tx.send(Ok(full)).await.is_err() {
                            return Ok(false);
                        }
                    }
                }
                Ok::<_, ReplayError>(true)
            }
            .await;
            match result {
                Ok(true) => {}
                // The apply stopped reading.
                Ok(false) => return,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        if !chunk.is_empty() {
            let _ = tx.send(Ok(chunk)).await;
        }
    });
    rx
}
