//! The raw audit log: `cdc_raw.cdc_events` (one row per change) and `cdc_raw.cdc_rejects`,
//! written with binary COPY, with the checkpoint advanced in the same transaction.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use postgres_types::{Json, ToSql, Type};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::{Client, Transaction};

use super::{checkpoint, Ack, Bisect, ErrorClass, Offsets, Savepoint, Sink, SinkError, WriteStats};
use crate::batch::Batch;
use crate::config::PostgresConfig;
use crate::domain::{KafkaCoordinates, LogBounds, TopicPartition};
use crate::envelope::avro::WriterSchema;
use crate::envelope::{ChangeEvent, Decoded, RowSchema};

pub const NAME: &str = "raw";

const EVENT_COLUMNS: &str = "kafka_topic, kafka_partition, kafka_offset, kafka_timestamp, \
    event_key, operation, source_table, source_db, before_data, after_data, source_metadata, \
    transaction_data, source_lsn, commit_lsn, event_timestamp, ingested_at, row_schema, \
    key_schema_id, value_schema_id, record_key, record_value";
const EVENT_TYPES: &[Type] = &[
    Type::TEXT,
    Type::INT4,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::JSONB,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::JSONB,
    Type::JSONB,
    Type::JSONB,
    Type::INT8,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::BYTEA,
    Type::BYTEA,
];
/// JSON text as received (a change's `source` block), sent as jsonb verbatim, as `Json` of a
/// `RawValue` sends it, without a copy into a `RawValue` of its own.
#[derive(Debug)]
struct JsonText<'a>(&'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        if *ty == Type::JSONB {
            // jsonb's binary format: a version byte, then the text.
            out.put_u8(1);
        }
        out.put_slice(self.0.as_bytes());
        Ok(postgres_types::IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }

    postgres_types::to_sql_checked!();
}

const REJECT_COLUMNS: &str =
    "kafka_topic, kafka_partition, kafka_offset, kafka_timestamp, raw_key, raw_value, stage, reason";
const REJECT_TYPES: &[Type] = &[
    Type::TEXT,
    Type::INT4,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::BYTEA,
    Type::BYTEA,
    Type::TEXT,
    Type::TEXT,
];

pub struct RawSink {
    pg: PostgresConfig,
    consumer: String,
    client: Option<Client>,
    /// Row schemas known to be in `cdc_raw.cdc_row_schemas` (committed).
    stored_schemas: HashSet<i64>,
    /// Avro writer schemas known to be in `cdc_raw.cdc_avro_schemas` (committed).
    stored_avro: HashSet<u32>,
}

/// Schemas a batch refers to that this sink has not stored yet.
#[derive(Default)]
struct NewSchemas {
    rows: Vec<Arc<RowSchema>>,
    avro: Vec<Arc<WriterSchema>>,
}

fn pg_err(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
    move |source| SinkError::Postgres {
        sink: NAME,
        context: context.into(),
        source,
    }
}

/// A timestamp column's value: NULL where PostgreSQL's range ends (the envelope keeps the
/// number verbatim).
fn ms_to_ts(ms: Option<i64>) -> Option<DateTime<Utc>> {
    crate::db::pg_timestamp(ms)
}

impl RawSink {
    pub fn new(pg: PostgresConfig, consumer: impl Into<String>) -> Self {
        Self {
            pg,
            consumer: consumer.into(),
            client: None,
            stored_schemas: HashSet::new(),
            stored_avro: HashSet::new(),
        }
    }

    async fn client(&mut self) -> Result<&mut Client, SinkError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(super::connect(&self.pg, NAME).await?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    async fn write_inner(&mut self, batch: &Batch) -> Result<Ack, SinkError> {
        let ranges = batch.ranges();
        let tps: Vec<TopicPartition> = ranges.keys().cloned().collect();
        let consumer = self.consumer.clone();
        let new_schemas = self.new_schemas(batch);
        let client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err("beginning"))?;
        let stored = checkpoint::lock(&tx, NAME, &consumer, &tps).await?;
        // Checked before writing anything: a batch that does not continue from the checkpoint
        // would leave a gap.
        let next = checkpoint::after_batch(NAME, &ranges, &stored)?;
        let is_new =
            |tp: &TopicPartition, offset: i64| offset >= stored.get(tp).copied().unwrap_or(0);

        store_schemas(&tx, &new_schemas).await?;

        let mut stats = WriteStats::default();
        let mut changes: Vec<&ChangeEvent> = Vec::new();
        let mut rejects: Vec<RejectRow> = Vec::new();
        for r in &batch.records {
            let c = r.coords();
            if !is_new(&c.topic_partition(), c.offset) {
                stats.already_stored += 1;
                continue;
            }
            match r {
                Decoded::Change(e) => match unstorable(e) {
                    None => changes.push(e),
                    Some(reason) => rejects.push(RejectRow::change(e, reason)),
                },
                Decoded::Reject(rej) => {
                    rejects.push(RejectRow {
                        coords: &rej.coords,
                        key: rej.key.as_deref(),
                        value: rej.value.as_deref(),
                        stage: "decode",
                        reason: rej.reason.clone(),
                    });
                    *stats.ignored.entry("rejected").or_default() += 1;
                }
                Decoded::Skip(_, reason) => *stats.ignored.entry(reason.as_str()).or_default() += 1,
            }
        }
        let unstored = copy_isolating(&tx, &changes).await?;
        stats.written = (changes.len() - unstored.len()) as u64;
        for (e, reason) in unstored {
            rejects.push(RejectRow::change(e, reason));
        }
        let raw_rejects = rejects.iter().filter(|r| r.stage == STAGE).count() as u64;
        if raw_rejects > 0 {
            *stats.ignored.entry("rejected_by_raw").or_default() += raw_rejects;
            tracing::warn!(
                rejected = raw_rejects,
                "changes the raw log cannot store as decoded went to cdc_raw.cdc_rejects (stage raw) with their exact bytes"
            );
        }
        copy_rejects(&tx, &rejects).await?;

        checkpoint::advance(&tx, NAME, &consumer, &next).await?;
        tx.commit().await.map_err(pg_err("committing"))?;
        self.remember(&new_schemas);
        Ok(Ack {
            durable: next.into_iter().collect(),
            stats,
        })
    }
}

/// The stage name of the raw sink's own rejects.
const STAGE: &str = "raw";

/// One row of `cdc_raw.cdc_rejects`: the record's exact bytes, where it failed and why.
struct RejectRow<'a> {
    coords: &'a KafkaCoordinates,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    stage: &'static str,
    reason: String,
}

impl<'a> RejectRow<'a> {
    /// A decoded change the raw log cannot store.
    fn change(e: &'a ChangeEvent, reason: String) -> Self {
        Self {
            coords: &e.coords,
            key: e.received_key(),
            value: Some(e.received_value()),
            stage: STAGE,
            reason,
        }
    }
}

/// Why a change cannot be a raw-log row, when that is known without asking PostgreSQL.
fn unstorable(e: &ChangeEvent) -> Option<String> {
    match e.coords.timestamp_ms {
        Some(ms) if crate::db::pg_timestamp(Some(ms)).is_none() => Some(format!(
            "raw log cannot store this change of {}: its Kafka timestamp {ms} ms is outside PostgreSQL's timestamptz range",
            e.table
        )),
        _ => None,
    }
}

/// COPYs `changes` into `cdc_raw.cdc_events`; when that fails on the data of some change,
/// narrows it down (each attempt in a savepoint) and returns the changes that cannot be
/// stored, with the reason. The rest are stored.
async fn copy_isolating<'e>(
    tx: &Transaction<'_>,
    changes: &[&'e ChangeEvent],
) -> Result<Vec<(&'e ChangeEvent, String)>, SinkError> {
    let mut bad = Vec::new();
    let mut bisect = Bisect::new(changes.len());
    while let Some(range) = bisect.next_range() {
        let attempt = Savepoint::begin(tx, NAME, "cdc_raw_copy").await?;
        match copy_events(tx, &changes[range.clone()]).await {
            Ok(()) => attempt.release().await?,
            Err(e) if e.class() == ErrorClass::BadData => {
                attempt.rollback().await?;
                if let Some(i) = bisect.failed(range) {
                    let reason = format!(
                        "raw log cannot store this change of {} as decoded: {e}",
                        changes[i].table
                    );
                    bad.push((changes[i], reason));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(bad)
}

/// COPYs reject rows into `cdc_raw.cdc_rejects`.
async fn copy_rejects(tx: &Transaction<'_>, rejects: &[RejectRow<'_>]) -> Result<(), SinkError> {
    if rejects.is_empty() {
        return Ok(());
    }
    let sink = tx
        .copy_in(&format!(
            "COPY cdc_raw.cdc_rejects ({REJECT_COLUMNS}) FROM STDIN BINARY"
        ))
        .await
        .map_err(pg_err("starting COPY into cdc_rejects"))?;
    let writer = BinaryCopyInWriter::new(sink, REJECT_TYPES);
    futures::pin_mut!(writer);
    for r in rejects {
        let reason = crate::db::pg_text(&r.reason);
        let row: [&(dyn ToSql + Sync); 8] = [
            &r.coords.topic,
            &r.coords.partition,
            &r.coords.offset,
            &crate::db::pg_timestamp(r.coords.timestamp_ms),
            &r.key,
            &r.value,
            &r.stage,
            &reason.as_ref(),
        ];
        writer
            .as_mut()
            .write(&row)
            .await
            .map_err(pg_err("copying into cdc_rejects"))?;
    }
    writer
        .finish()
        .await
        .map_err(pg_err("finishing COPY into cdc_rejects"))?;
    Ok(())
}

/// COPYs changes into `cdc_raw.cdc_events`.
async fn copy_events(tx: &Transaction<'_>, changes: &[&ChangeEvent]) -> Result<(), SinkError> {
    if changes.is_empty() {
        return Ok(());
    }
    let now = Utc::now();
    let sink = tx
        .copy_in(&format!(
            "COPY cdc_raw.cdc_events ({EVENT_COLUMNS}) FROM STDIN BINARY"
        ))
        .await
        .map_err(pg_err("starting COPY into cdc_events"))?;
    let writer = BinaryCopyInWriter::new(sink, EVENT_TYPES);
    futures::pin_mut!(writer);
    for e in changes {
        let before = e
            .before
            .as_ref()
            .map(|b| e.sql_image(b, true).unwrap_or(Cow::Borrowed(b)));
        let after = e
            .after
            .as_ref()
            .map(|a| e.sql_image(a, true).unwrap_or(Cow::Borrowed(a)));
        let source_table = e.table.to_string();
        let avro = e.avro.as_deref();
        let key_schema = avro.and_then(|a| a.key_schema.as_ref().map(|w| i64::from(w.id())));
        let value_schema = avro.map(|a| i64::from(a.value_schema.id()));
        let row: [&(dyn ToSql + Sync); 21] = [
            &e.coords.topic,
            &e.coords.partition,
            &e.coords.offset,
            &ms_to_ts(e.coords.timestamp_ms),
            &e.key.as_ref().map(Json),
            &e.op.code(),
            &source_table,
            &e.source.db,
            &before.as_ref().map(Json),
            &after.as_ref().map(Json),
            &JsonText(e.source_text()),
            &e.transaction.as_ref().map(Json),
            &e.source.lsn,
            &e.position.commit_lsn,
            &ms_to_ts(e.event_time_ms()),
            &now,
            &e.schema.id,
            &key_schema,
            &value_schema,
            &avro.and_then(|a| a.key.as_deref()),
            &avro.map(|a| a.value.as_slice()),
        ];
        writer
            .as_mut()
            .write(&row)
            .await
            .map_err(pg_err("copying into cdc_events"))?;
    }
    writer
        .finish()
        .await
        .map_err(pg_err("finishing COPY into cdc_events"))?;
    Ok(())
}

impl RawSink {
    /// Stores changes outside the checkpoint (rejects that decode now) and deletes their
    /// decode-stage reject rows, in one transaction.
    pub async fn store_reprocessed(&mut self, batch: &Batch) -> Result<u64, SinkError> {
        let new_schemas = self.new_schemas(batch);
        let client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err("beginning"))?;
        store_schemas(&tx, &new_schemas).await?;
        let changes: Vec<&ChangeEvent> = batch
            .records
            .iter()
            .filter_map(|r| match r {
                Decoded::Change(e) => Some(e.as_ref()),
                _ => None,
            })
            .collect();
        copy_events(&tx, &changes).await?;
        for r in &batch.records {
            let c = r.coords();
            tx.execute(
                "DELETE FROM cdc_raw.cdc_rejects
                  WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset = $3 AND stage = 'decode'",
                &[&c.topic, &c.partition, &c.offset],
            )
            .await
            .map_err(pg_err("deleting a reprocessed reject"))?;
        }
        tx.commit().await.map_err(pg_err("committing"))?;
        self.remember(&new_schemas);
        Ok(changes.len() as u64)
    }

    /// Declared row schemas and Avro writer schemas of this batch's changes that this sink has
    /// not stored yet.
    fn new_schemas(&self, batch: &Batch) -> NewSchemas {
        let mut rows: HashMap<i64, Arc<RowSchema>> = HashMap::new();
        let mut avro: HashMap<u32, Arc<WriterSchema>> = HashMap::new();
        for r in &batch.records {
            let Decoded::Change(e) = r else { continue };
            if let Some(id) = e.schema.id.filter(|id| !self.stored_schemas.contains(id)) {
                rows.entry(id).or_insert_with(|| e.schema.clone());
            }
            if let Some(record) = &e.avro {
                let writers = record.key_schema.iter().chain([&record.value_schema]);
                for w in writers.filter(|w| !self.stored_avro.contains(&w.id())) {
                    avro.entry(w.id()).or_insert_with(|| w.clone());
                }
            }
        }
        NewSchemas {
            rows: rows.into_values().collect(),
            avro: avro.into_values().collect(),
        }
    }

    /// Notes schemas a committed transaction stored.
    fn remember(&mut self, stored: &NewSchemas) {
        self.stored_schemas
            .extend(stored.rows.iter().filter_map(|s| s.id));
        self.stored_avro.extend(stored.avro.iter().map(|w| w.id()));
    }
}

/// Stores row schemas and Avro writer schemas in the batch's transaction, so no event refers
/// to a missing schema.
async fn store_schemas(
    tx: &tokio_postgres::Transaction<'_>,
    schemas: &NewSchemas,
) -> Result<(), SinkError> {
    if !schemas.rows.is_empty() {
        let ids: Vec<i64> = schemas.rows.iter().filter_map(|s| s.id).collect();
        let columns: Vec<Json<&Vec<crate::envelope::Column>>> =
            schemas.rows.iter().map(|s| Json(&s.columns)).collect();
        tx.execute(
            "INSERT INTO cdc_raw.cdc_row_schemas (id, columns)
             SELECT * FROM unnest($1::bigint[], $2::jsonb[]) ON CONFLICT DO NOTHING",
            &[&ids, &columns],
        )
        .await
        .map_err(pg_err("storing row schemas"))?;
    }
    if !schemas.avro.is_empty() {
        let ids: Vec<i64> = schemas.avro.iter().map(|w| i64::from(w.id())).collect();
        let texts: Vec<&str> = schemas.avro.iter().map(|w| w.text()).collect();
        tx.execute(
            "INSERT INTO cdc_raw.cdc_avro_schemas (id, schema)
             SELECT * FROM unnest($1::bigint[], $2::text[]) ON CONFLICT DO NOTHING",
            &[&ids, &texts],
        )
        .await
        .map_err(pg_err("storing Avro writer schemas"))?;
    }
    Ok(())
}

impl Sink for RawSink {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn checkpoints(&mut self, partitions: &[TopicPartition]) -> Result<Offsets, SinkError> {
        let consumer = self.consumer.clone();
        let client = self.client().await?;
        checkpoint::load(&*client, NAME, &consumer, partitions).await
    }

    async fn write(&mut self, batch: &Batch) -> Result<Ack, SinkError> {
        if batch.is_empty() {
            return Ok(Ack::default());
        }
        let result = self.write_inner(batch).await;
        if result.as_ref().is_err_and(SinkError::needs_reconnect) {
            self.client = None;
        }
        result
    }

    async fn flush(&mut self, _force: bool) -> Result<Ack, SinkError> {
        // Every write commits; nothing is buffered.
        Ok(Ack::default())
    }

    fn revoke(&mut self, _partitions: &[TopicPartition]) {}

    /// The old log's rows at offsets the new log reuses move to `cdc_raw.cdc_events_superseded`
    /// (and its rejects to `cdc_rejects_superseded`) in the checkpoint's transaction: the
    /// audit keeps both logs, and the live log holds one record per offset of the current one.
    async fn rebase(
        &mut self,
        tp: &TopicPartition,
        stale: i64,
        log: LogBounds,
    ) -> Result<Option<i64>, SinkError> {
        let consumer = self.consumer.clone();
        let client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err("beginning"))?;
        let (next, moved) = checkpoint::rebase(&tx, NAME, &consumer, tp, stale, log).await?;
        if moved {
            let events = tx
                .execute(
                    "WITH moved AS (
                         DELETE FROM cdc_raw.cdc_events
                          WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset >= $3
                         RETURNING *)
                     INSERT INTO cdc_raw.cdc_events_superseded SELECT * FROM moved",
                    &[&tp.topic, &tp.partition, &log.start],
                )
                .await
                .map_err(pg_err("moving the old log's rows aside"))?;
            let rejects =
                super::supersede_rejects(&tx, NAME, &["decode", STAGE], tp, log.start).await?;
            tracing::warn!(%tp, events, rejects, "raw log: the old log's rows from the new log's start moved to cdc_raw.cdc_events_superseded");
        }
        tx.commit().await.map_err(pg_err("committing"))?;
        Ok(Some(next))
    }
}
