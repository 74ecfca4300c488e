//! Producing a batch's routed records in order and waiting for every acknowledgement.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::topics::{client_config, kafka_err};
use super::NAME;
use crate::config::KafkaConfig;
use crate::envelope::ChangeEvent;
use crate::route::{output, Filter};
use crate::sink::SinkError;

/// The producer of routed records (the pod's and the backfill's).
pub(crate) fn producer(kafka: &KafkaConfig, client_id: &str) -> Result<FutureProducer, SinkError> {
    client_config(kafka)
        .set("client.id", client_id)
        .set("acks", "all")
        // Retries keep a partition's order: the records of a key stay in source order.
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // A broker that does not acknowledge within this fails the batch (retried, pod not
        // ready) instead of holding the checkpoint lock for librdkafka's 5 minutes.
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(kafka_err("creating the route producer"))
}

/// One record to produce: the change, the filter and its rendered value.
pub(crate) struct Outgoing<'a> {
    pub(super) index: usize,
    pub(super) filter: &'a Filter,
    pub(super) event: &'a ChangeEvent,
    pub(super) partition: i32,
    value: Vec<u8>,
}

impl<'a> Outgoing<'a> {
    /// `index` is the filter's position in the file (for its counters).
    pub(crate) fn new(
        index: usize,
        filter: &'a Filter,
        event: &'a ChangeEvent,
        partition: i32,
        value: Vec<u8>,
    ) -> Self {
        Self {
            index,
            filter,
            event,
            partition,
            value,
        }
    }
}

/// Produces every record and waits for all acknowledgements; returns each record's offset.
pub(crate) async fn produce(
    producer: &FutureProducer,
    sends: &[Outgoing<'_>],
) -> Result<Vec<i64>, SinkError> {
    let failed = |s: &Outgoing, source: KafkaError| SinkError::Kafka {
        sink: NAME,
        context: format!("producing to {}[{}]", s.filter.topic, s.partition),
        source: Box::new(source),
    };
    // Enqueued one after the other, in batch order: librdkafka keeps that order per partition
    // (idempotent producer), so a key's changes reach the topic in source order. A full
    // queue is waited out here, never by letting a later record overtake.
    let mut deliveries = Vec::with_capacity(sends.len());
    for s in sends {
        let source = output::headers(s.event, &s.filter.id);
        let mut headers = OwnedHeaders::new_with_capacity(source.len());
        for (k, v) in &source {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&s.filter.topic)
            .partition(s.partition)
            .payload(&s.value[..])
            .headers(headers);
        if let Some(k) = output::key(s.event) {
            record = record.key(k);
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(failed(s, e)),
            }
        }
    }
    let results = futures::future::join_all(deliveries).await;
    results
        .into_iter()
        .zip(sends)
        .map(|(r, s)| match r {
            Ok(Ok(delivery)) => Ok(delivery.offset),
            Ok(Err((e, _))) => Err(failed(s, e)),
            Err(_canceled) => Err(failed(s, KafkaError::Canceled)),
        })
        .collect()
}
