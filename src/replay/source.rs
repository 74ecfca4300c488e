//! Where a replay reads changes from: the raw log in PostgreSQL, or the lake's Parquet files.
//!
//! Both readers yield changes partition by partition in offset order, which keeps every key's
//! changes in order (a key lives in one partition). The raw log stores values already converted
//! for PostgreSQL plus each declared row schema; the lake stores the envelope as received, which
//! is decoded again with the live decoder.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::error::{Context, ReplayError, ReplayResult};
use bytes::Bytes;
use futures::{pin_mut, TryStreamExt};
use object_store::ObjectStore;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::Selection;
use crate::domain::{KafkaCoordinates, TableId, TopicPartition};
use crate::envelope::avro::json_converter_envelope;
use crate::envelope::{
    json, parse_source, ChangeEvent, Column, Decoded, Decoder, InferredSchemas, Op, RowSchema,
    ValueForm,
};
use crate::sink::lake::compaction::{ranges_with_files, read_partition};
use crate::sink::lake::encode::{AVRO_CONNECT_SCHEMAS, AVRO_SCHEMA_ID};
use crate::sink::lake::manifest::{Commit, Layout};

/// What a selection covers, known before anything is written.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// Per partition: (first, last) offset of the selected changes.
    pub partitions: BTreeMap<TopicPartition, (i64, i64)>,
    /// Source tables (`schema.table`) with selected changes.
    pub tables: BTreeSet<TableId>,
    /// Number of selected changes (before the `--until` filter for the lake, which needs
    /// the envelopes).
    pub events: u64,
}

/// Chunks of changes in replay order; the reader stops when the receiver is dropped.
pub type Chunks = mpsc::Receiver<ReplayResult<Vec<Decoded>>>;

const CHUNK: usize = 5_000;

/// Runs a reader task. A reader that panics ends its stream with an error: a closed channel
/// alone reads as "nothing more to replay", which would turn a crash into a silent short replay.
fn spawn_reader<F>(tx: mpsc::Sender<ReplayResult<Vec<Decoded>>>, reader: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let task = tokio::spawn(reader);
    tokio::spawn(async move {
        if let Err(e) = task.await {
            let reason = match e.try_into_panic() {
                Ok(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into()),
                Err(e) => e.to_string(),
            };
            let _ = tx
                .send(Err(ReplayError::Corrupt(format!(
                    "the replay reader stopped: {reason}"
                ))))
                .await;
        }
    });
}

/// `schema.table` as stored in the raw log and the manifest.
fn table_id(s: &str) -> TableId {
    match s.split_once('.') {
        Some((schema, table)) => TableId::new(schema, table),
        None => TableId::new("", s),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw log

/// The WHERE clause of a selection over `cdc_raw.cdc_events`, with its parameters.
fn raw_filter(sel: &Selection) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut clauses = vec!["kafka_offset >= $1".to_string()];
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(sel.from_offset)];
    let mut add = |clause: &str, p: Box<dyn ToSql + Sync + Send>| {
        params.push(p);
        clauses.push(clause.replace('?', &format!("${}", params.len())));
    };
    if let Some(t) = &sel.topic {
        add("kafka_topic = ?", Box::new(t.clone()));
    }
    if let Some(p) = sel.partition {
        add("kafka_partition = ?", Box::new(p));
    }
    if let Some(to) = sel.to_offset {
        add("kafka_offset <= ?", Box::new(to));
    }
    if let Some(ts) = sel.until_time() {
        add("event_timestamp <= ?", Box::new(ts));
    }
    if let Some(lsn) = sel.until_lsn() {
        add("source_lsn <= ?", Box::new(lsn));
    }
    (clauses.join(" AND "), params)
}

fn params_ref(p: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    p.iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// Counts and ranges of the selection in the raw log.
pub async fn plan_raw(client: &Client, sel: &Selection) -> ReplayResult<Plan> {
    let (filter, params) = raw_filter(sel);
    let rows = client
        .query(
            &format!(
                "SELECT kafka_topic, kafka_partition, min(kafka_offset), max(kafka_offset),
                        count(*), array_agg(DISTINCT source_table)
                   FROM cdc_raw.cdc_events WHERE {filter}
                  GROUP BY kafka_topic, kafka_partition"
            ),
            &params_ref(&params),
        )
        .await
        .context("reading the selection from cdc_raw.cdc_events")?;
    let mut plan = Plan::default();
    for r in rows {
        let tp = TopicPartition::new(r.get::<_, String>(0), r.get(1));
        plan.partitions.insert(tp, (r.get(2), r.get(3)));
        plan.events += r.get::<_, i64>(4) as u64;
        for t in r.get::<_, Vec<String>>(5) {
            plan.tables.insert(table_id(&t));
        }
    }
    Ok(plan)
}

/// Declared row schemas by id.
async fn row_schemas(client: &Client) -> ReplayResult<HashMap<i64, Arc<RowSchema>>> {
    let rows = client
        .query("SELECT id, columns FROM cdc_raw.cdc_row_schemas", &[])
        .await
        .context("reading cdc_raw.cdc_row_schemas")?;
    let mut out = HashMap::new();
    for r in rows {
        let id: i64 = r.get(0);
        let columns: Vec<Column> = serde_json::from_value(r.get::<_, Value>(1))
            .with_context(|| format!("row schema {id} in cdc_raw.cdc_row_schemas is malformed"))?;
        out.insert(
            id,
            Arc::new(RowSchema {
                columns,
                declared: true,
                id: Some(id),
            }),
        );
    }
    Ok(out)
}

fn into_map(v: Option<Value>) -> Option<Map<String, Value>> {
    match v {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// The envelope a replayed change records if it is rejected: rebuilt from what the log holds,
/// serialized from borrowed parts (the same text `json!` of copies of them gave, without the
/// copies).
#[derive(serde::Serialize)]
struct RebuiltEnvelope<'a> {
    before: &'a Option<Map<String, Value>>,
    after: &'a Option<Map<String, Value>>,
    op: &'a str,
    source: &'a RawValue,
}

/// One raw-log row back into the change the live pod applied.
fn raw_change(
    r: &tokio_postgres::Row,
    schemas: &HashMap<i64, Arc<RowSchema>>,
    inferred: &mut InferredSchemas,
) -> ReplayResult<ChangeEvent> {
    let coords = KafkaCoordinates {
        topic: r.get(0),
        partition: r.get(1),
        offset: r.get(2),
        timestamp_ms: r.get(3),
    };
    // The JSON columns arrive as text and parse as deep as jsonb holds (envelope::json);
    // tokio-postgres's own jsonb decoding stops at 128 levels.
    let json_column = |i: usize| -> ReplayResult<Option<Value>> {
        r.get::<_, Option<&str>>(i)
            .map(json::from_str::<Value>)
            .transpose()
            .with_context(|| format!("{coords:?}: column {i} of the raw log is not JSON"))
    };
    let key: Option<Value> = json_column(4)?;
    let op_code: &str = r.get(5);
    let op = Op::parse(op_code).with_context(|| format!("{coords:?}: unknown op {op_code:?}"))?;
    let before = into_map(json_column(6)?);
    let after = into_map(json_column(7)?);
    let source_text: String = r.get(8);
    let source_json = RawValue::from_string(source_text)
        .with_context(|| format!("{coords:?}: the raw log's source block is not JSON"))?;
    let (source, table) =
        parse_source(&source_json).map_err(|e| ReplayError::Corrupt(format!("{coords:?}: {e}")))?;
    let transaction = r
        .get::<_, Option<String>>(9)
        .map(RawValue::from_string)
        .transpose()
        .with_context(|| format!("{coords:?}: the raw log's transaction block is not JSON"))?;
    let schema = match r.get::<_, Option<i64>>(10) {
        Some(id) => schemas
            .get(&id)
            .cloned()
            .with_context(|| format!("{coords:?}: row schema {id} is missing"))?,
        // Schemaless input: infer from the values again, as the live pod did, and share the
        // schema between changes of one shape as the live decoder does (the state sink skips
        // its per-change schema checks for a schema it has just seen).
        None => inferred.share_change(before.as_ref(), after.as_ref()),
    };
    let raw_value = serde_json::to_string(&RebuiltEnvelope {
        before: &before,
        after: &after,
        op: op_code,
        source: &source_json,
    })
    .expect("JSON values always serialize");
    Ok(ChangeEvent {
        raw_key: key.as_ref().map(|k| Arc::from(k.to_string())),
        position: source.position(coords.offset),
        coords,
        key,
        op,
        table,
        before,
        after,
        values: ValueForm::Sql,
        source,
        source_json,
        transaction,
        ts_ms: None,
        schema,
        raw_value: Arc::from(raw_value),
        avro: None,
    })
}

/// Streams the selection from the raw log in (topic, partition, offset) order.
pub async fn read_raw(client: Client, sel: Selection) -> ReplayResult<Chunks> {
    let schemas = row_schemas(&client).await?;
    let (tx, rx) = mpsc::channel(2);
    spawn_reader(tx.clone(), async move {
        let result = async {
            let (filter, params) = raw_filter(&sel);
            let sql = format!(
                "SELECT kafka_topic, kafka_partition, kafka_offset,
                        (extract(epoch FROM kafka_timestamp) * 1000)::bigint,
                        event_key::text, operation, before_data::text, after_data::text,
                        source_metadata::text, transaction_data::text, row_schema
                   FROM cdc_raw.cdc_events WHERE {filter}
                  ORDER BY kafka_topic, kafka_partition, kafka_offset"
            );
            let stream = client
                .query_raw(&sql, params_ref(&params))
                .await
                .context("reading cdc_raw.cdc_events")?;
            pin_mut!(stream);
            let mut chunk = Vec::with_capacity(CHUNK);
            let mut inferred = InferredSchemas::default();
            while let Some(row) = stream
                .try_next()
                .await
                .context("reading cdc_raw.cdc_events")?
            {
                chunk.push(Decoded::Change(Arc::new(raw_change(
                    &row,
                    &schemas,
                    &mut inferred,
                )?)));
                if chunk.len() == CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                    if tx.send(Ok(full)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            if !chunk.is_empty() {
                let _ = tx.send(Ok(chunk)).await;
            }
            Ok::<_, ReplayError>(())
        }
        .await;
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    });
    Ok(rx)
}

// ---------------------------------------------------------------------------------------------
// Lake

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

/// Decodes one Parquet file's records with the live decoder.
fn decode_file(bytes: Bytes, decoder: &mut Decoder, path: &str) -> ReplayResult<Vec<Decoded>> {
    use arrow::array::Array;
    use arrow::datatypes::{Int32Type, Int64Type};

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
    let reader = builder
        .with_projection(mask)
        .build()
        .with_context(|| format!("reading {path}"))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("reading {path}"))?;
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
            out.push(decoder.decode(coords, k, Some(value.as_bytes())));
        }
    }
    Ok(out)
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

/// Streams the selected commits' records, commit by commit in offset order.
pub fn read_lake(store: Arc<dyn ObjectStore>, commits: Vec<Commit>, sel: Selection) -> Chunks {
    let (tx, rx) = mpsc::channel(2);
    spawn_reader(tx.clone(), async move {
        let mut decoder = Decoder::new();
        for commit in commits {
            let result = async {
                let mut records = Vec::new();
                for f in &commit.files {
                    let path = crate::sink::lake::manifest::stored_path(&f.path);
                    let bytes = store
                        .get(&path)
                        .await
                        .with_context(|| format!("reading lake file {path}"))?
                        .bytes()
                        .await
                        .with_context(|| format!("reading lake file {path}"))?;
                    records.extend(decode_file(bytes, &mut decoder, &f.path)?);
                }
                // A commit's files split one offset range by table: merge them back in order.
                records.sort_by_key(|r| r.coords().offset);
                records.retain(|r| sel.selects(r));
                Ok::<_, ReplayError>(records)
            }
            .await;
            let stop = result.is_err();
            if tx.send(result).await.is_err() || stop {
                return;
            }
        }
    });
    rx
}

/// Fails when the selection is empty, naming what it looked for.
pub fn ensure_not_empty(plan: &Plan, sel: &Selection, source: &str) -> ReplayResult<()> {
    if plan.events == 0 {
        return Err(ReplayError::Refused(format!(
            "nothing to replay: no change in the {source} matches {sel}"
        )));
    }
    Ok(())
}
