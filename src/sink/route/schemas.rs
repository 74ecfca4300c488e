//! The route sink's Avro output schemas (`format: avro`): one per output topic, source writer
//! schema and shape, registered under `<topic>-value` (Confluent's TopicNameStrategy) the first
//! time a record needs it, and kept for the pod's life (an id never changes its schema).

use std::collections::HashMap;

use super::{SinkError, NAME};
use crate::config::SchemaRegistryConfig;
use crate::envelope::avro::WriterSchema;
use crate::route::avro::output_schema;
use crate::route::OutputShape;
use crate::source::registry::{RegisterError, SchemaRegistry};

pub struct OutputSchemas {
    registry: Option<SchemaRegistry>,
    ids: HashMap<(String, u32, OutputShape), u32>,
    /// Schemas the registry refused, with the reason, until the next batch: a subject's
    /// compatibility setting can change, but one batch asks once.
    refused: HashMap<(String, u32, OutputShape), String>,
}

impl OutputSchemas {
    pub fn new(registry: Option<&SchemaRegistryConfig>) -> Result<Self, SinkError> {
        let registry = registry
            .map(|cfg| {
                let runtime = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
                SchemaRegistry::new(cfg, runtime)
            })
            .transpose()
            .map_err(|reason| SinkError::Mapping {
                target: NAME,
                reason: format!("kafka.schema_registry: {reason}"),
            })?;
        Ok(Self {
            registry,
            ids: HashMap::new(),
            refused: HashMap::new(),
        })
    }

    /// A new batch asks again for what the registry refused before.
    pub fn forget_refusals(&mut self) {
        self.refused.clear();
    }

    /// The registry id of the schema of `topic`'s records built from records of `writer` in
    /// `shape`. `Ok(Err(reason))`: the schema cannot be had (the registry refuses it, or it
    /// cannot be derived), so the change is rejected with the reason. `Err`: the registry
    /// cannot answer now; the batch is retried.
    pub async fn id(
        &mut self,
        topic: &str,
        writer: &WriterSchema,
        shape: OutputShape,
    ) -> Result<Result<u32, String>, SinkError> {
        let key = (topic.to_string(), writer.id(), shape);
        if let Some(id) = self.ids.get(&key) {
            return Ok(Ok(*id));
        }
        if let Some(reason) = self.refused.get(&key) {
            return Ok(Err(reason.clone()));
        }
        let Some(registry) = &self.registry else {
            return Ok(Err("format avro needs kafka.schema_registry".into()));
        };
        let schema = match output_schema(writer, shape) {
            Ok(s) => s,
            Err(reason) => {
                self.refused.insert(key, reason.clone());
                return Ok(Err(reason));
            }
        };
        match registry.register(&format!("{topic}-value"), &schema).await {
            Ok(id) => {
                tracing::info!(
                    topic,
                    source_schema = writer.id(),
                    id,
                    "route: output schema registered"
                );
                self.ids.insert(key, id);
                Ok(Ok(id))
            }
            Err(e @ RegisterError::Refused { .. }) => {
                let reason = e.to_string();
                self.refused.insert(key, reason.clone());
                Ok(Err(reason))
            }
            Err(source @ RegisterError::Unavailable { .. }) => {
                Err(SinkError::Registry { sink: NAME, source })
            }
        }
    }
}
