//! The Avro side of a route backfill (`format: avro` filters). The raw log keeps every Avro
//! change's bytes as received (`record_value`) and the writer schemas they name
//! (`cdc_raw.cdc_avro_schemas`), so a filter's history is routed from the same bytes the live
//! route used, and the registry is asked only to register the output schema.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_postgres::Transaction;

use super::error::Context;
use super::{ReplayError, ReplayResult};
use crate::config::Config;
use crate::domain::TopicPartition;
use crate::envelope::avro::WriterSchema;
use crate::envelope::ChangeEvent;
use crate::route::{avro, Filter};
use crate::sink::route::OutputSchemas;

/// A change's Avro value as the raw log kept it, with its writer schema.
pub struct AvroBytes {
    writer: Arc<WriterSchema>,
    value: Vec<u8>,
}

pub struct AvroHistory {
    writers: HashMap<i64, Arc<WriterSchema>>,
    outputs: OutputSchemas,
}

impl AvroHistory {
    pub fn new(config: &Config) -> ReplayResult<Self> {
        Ok(Self {
            writers: HashMap::new(),
            outputs: OutputSchemas::new(config.kafka.schema_registry.as_ref())?,
        })
    }

    /// The Avro values the raw log keeps for offsets `from..=to` of `tp`, by offset (changes
    /// that arrived as JSON have none).
    pub async fn chunk(
        &mut self,
        tx: &Transaction<'_>,
        tp: &TopicPartition,
        from: i64,
        to: i64,
    ) -> ReplayResult<HashMap<i64, AvroBytes>> {
        let rows = tx
            .query(
                "SELECT kafka_offset, value_schema_id, record_value FROM cdc_raw.cdc_events
                  WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset BETWEEN $3 AND $4
                    AND record_value IS NOT NULL AND value_schema_id IS NOT NULL",
                &[&tp.topic, &tp.partition, &from, &to],
            )
            .await
            .context(format!("reading the Avro records of {tp} from the raw log"))?;
        let mut missing: Vec<i64> = rows
            .iter()
            .map(|r| r.get::<_, i64>(1))
            .filter(|id| !self.writers.contains_key(id))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            for r in tx
                .query(
                    "SELECT id, schema FROM cdc_raw.cdc_avro_schemas WHERE id = ANY($1)",
                    &[&missing],
                )
                .await
                .context("reading cdc_raw.cdc_avro_schemas")?
            {
                let id: i64 = r.get(0);
                let writer = u32::try_from(id)
                    .map_err(|_| format!("schema id {id} is out of range"))
                    .and_then(|id32| WriterSchema::parse(id32, r.get(1)).map_err(|e| e.to_string()))
                    .map_err(|e| {
                        ReplayError::Corrupt(format!("cdc_raw.cdc_avro_schemas {id}: {e}"))
                    })?;
                self.writers.insert(id, Arc::new(writer));
            }
        }
        rows.into_iter()
            .map(|r| {
                let (offset, id): (i64, i64) = (r.get(0), r.get(1));
                let writer = self.writers.get(&id).cloned().ok_or_else(|| {
                    ReplayError::Corrupt(format!(
                        "{tp} offset {offset}: writer schema {id} is not in cdc_raw.cdc_avro_schemas"
                    ))
                })?;
                Ok((
                    offset,
                    AvroBytes {
                        writer,
                        value: r.get(2),
                    },
                ))
            })
            .collect()
    }

    /// The routed value of `e` for `filter`. `Ok(Err(reason))`: this change cannot be routed in
    /// Avro (it came as JSON, or the registry refuses the output schema).
    pub async fn value(
        &mut self,
        filter: &Filter,
        e: &ChangeEvent,
        bytes: Option<&AvroBytes>,
        filtered_at: DateTime<Utc>,
    ) -> ReplayResult<Result<Vec<u8>, String>> {
        let Some(bytes) = bytes else {
            return Ok(Err(avro::JSON_INPUT.into()));
        };
        let id = match self
            .outputs
            .id(&filter.topic, &bytes.writer, filter.output)
            .await?
        {
            Ok(id) => id,
            Err(reason) => return Ok(Err(reason)),
        };
        Ok(avro::value_of_record(
            filter,
            &bytes.writer,
            &bytes.value,
            e.op,
            id,
            filtered_at,
        ))
    }
}
