//! Reading a replay's changes from the raw log, `cdc_raw.cdc_events`: one query in (topic,
//! partition, offset) order, each row turned back into the change the live pod applied.

use std::collections::HashMap;
use std::sync::Arc;

use futures::{pin_mut, TryStreamExt};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::{spawn_reader, table_id, Chunks, Plan};
use crate::config::PostgresConfig;
use crate::domain::{KafkaCoordinates, TopicPartition};
use crate::envelope::{
    json, parse_source, ChangeEvent, Column, Decoded, InferredSchemas, Op, RowSchema, SourceText,
    ValueForm,
};
use crate::replay::error::{Context, ReplayError, ReplayResult};
use crate::replay::Selection;

/// Changes per chunk of the stream.
const CHUNK: usize = 5_000;

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
        source_json: SourceText::Owned(source_json),
        transaction,
        ts_ms: None,
        schema,
        raw_value: Arc::from(raw_value),
        avro: None,
    })
}

/// Streams the selection from the raw log in (topic, partition, offset) order.
pub async fn read_raw(postgres: &PostgresConfig, sel: Selection) -> ReplayResult<Chunks> {
    let client = crate::db::connect(postgres, "cdc-replay reader").await?;
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
