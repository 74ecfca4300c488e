//! The broker read ceiling: a bare librdkafka consumer (no decoding, no sink) draining a topic
//! from its beginning, on the same broker and with the pod's fetch settings. `tools/bench`
//! reports the pod's throughput as a ratio to this rate.
//!
//! Usage: cargo run --release --example broker_read_ceiling -- BROKERS TOPIC RECORDS
//! Prints one JSON object: {"records": …, "bytes": …, "seconds": …, "records_per_s": …}.

use std::time::{Duration, Instant};

use cdc_lake::config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic, records] = args.as_slice() else {
        eprintln!("usage: broker_read_ceiling BROKERS TOPIC RECORDS");
        std::process::exit(2);
    };
    let expected: u64 = records.parse().expect("RECORDS is a count");
    // The pod's own consumer settings, so the ceiling is what the pod could read.
    let consumer: BaseConsumer = cdc_lake::source::client_config(&KafkaConfig {
        brokers: brokers.clone(),
        group_id: "cdc-lake-read-ceiling".into(),
        checkpoint_name: None,
        topics: vec![topic.clone()],
        properties: Default::default(),
        format: Default::default(),
        schema_registry: None,
    })
    .create()
    .expect("a consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("the topic's metadata");
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("a partition offset");
    }
    consumer.assign(&assignment).expect("the assignment");

    let (mut seen, mut bytes) = (0u64, 0u64);
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < expected && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                started.get_or_insert_with(Instant::now);
                seen += 1;
                bytes += (m.payload_len() + m.key().map_or(0, <[u8]>::len)) as u64;
            }
            Some(Err(e)) => eprintln!("consume error: {e}"),
            None => {}
        }
    }
    let seconds = started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    println!(
        "{}",
        serde_json::json!({
            "records": seen,
            "bytes": bytes,
            "seconds": seconds,
            "records_per_s": if seconds > 0.0 { seen as f64 / seconds } else { 0.0 },
        })
    );
    if seen < expected {
        std::process::exit(1);
    }
}
