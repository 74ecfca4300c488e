//! One Kafka record to a [`Decoded`], by the configured wire format: Debezium JSON, or
//! Confluent-framed Avro with its writer schema from the registry.

use rdkafka::Message;

use super::registry::{RegistryUnavailable, SchemaRegistry};
use crate::config::{KafkaConfig, RecordFormat};
use crate::domain::KafkaCoordinates;
use crate::envelope::avro::MAGIC;
use crate::envelope::{Decoded, Decoder};

pub struct RecordDecoder {
    decoder: Decoder,
    format: RecordFormat,
    /// Present when the format reads Avro (the config requires a registry then).
    registry: Option<SchemaRegistry>,
}

impl RecordDecoder {
    /// `runtime` runs the registry's requests.
    pub fn new(cfg: &KafkaConfig, runtime: tokio::runtime::Handle) -> Result<Self, String> {
        let registry = match (&cfg.schema_registry, cfg.format.reads_avro()) {
            (Some(registry), true) => Some(SchemaRegistry::new(registry, runtime)?),
            (None, true) => {
                return Err(format!(
                    "kafka.format = \"{}\" needs kafka.schema_registry",
                    cfg.format.as_str()
                ))
            }
            (_, false) => None,
        };
        Ok(Self {
            decoder: Decoder::new(),
            format: cfg.format,
            registry,
        })
    }

    /// Decodes `m`, or reports that its writer schema cannot be fetched now: the record then
    /// waits for the registry, and nothing after it on its partition may pass it.
    pub fn decode(&mut self, m: &impl Message) -> Result<Decoded, RegistryUnavailable> {
        let coords = KafkaCoordinates {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
        };
        self.decode_parts(coords, m.key(), m.payload())
    }

    /// Decodes a record given by its parts (a stored reject being decoded again). Blocks on
    /// the registry when it needs a schema it has not seen: call it off the async workers.
    pub fn decode_parts(
        &mut self,
        coords: KafkaCoordinates,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Decoded, RegistryUnavailable> {
        let avro = match self.format {
            RecordFormat::Json => false,
            RecordFormat::Avro => true,
            // Framed Avro starts with 0; JSON text never does.
            RecordFormat::Auto => value.and_then(<[u8]>::first) == Some(&MAGIC),
        };
        match (&mut self.registry, avro) {
            (Some(registry), true) => self
                .decoder
                .decode_avro(coords, key, value, |id| registry.lookup(id)),
            _ => Ok(self.decoder.decode(coords, key, value)),
        }
    }
}
