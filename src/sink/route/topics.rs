//! The Kafka side of the route sink: output topics (created or required), their watermarks,
//! and reading an output partition's tail for records already routed.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, Message};

use super::NAME;
use crate::config::{KafkaConfig, MissingTopic, RoutesConfig};
use crate::domain::TopicPartition;
use crate::route::output::{HEADER_FILTER, HEADER_OFFSET, HEADER_PARTITION, HEADER_TOPIC};
use crate::sink::SinkError;

const TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn kafka_err(context: impl Into<String>) -> impl FnOnce(KafkaError) -> SinkError {
    let context = context.into();
    move |source| SinkError::Kafka {
        sink: NAME,
        context,
        source: Box::new(source),
    }
}

/// The connection settings every route client shares: the brokers and the security settings
/// of `kafka.properties` (the consumer's own tuning is left out).
pub(crate) fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.properties {
        if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
            cc.set(k, v);
        }
    }
    cc
}

/// The context of a tail reader: reaching a partition's end is how its read ends, not an error
/// for the log.
struct TailReader;

impl ClientContext for TailReader {
    fn error(&self, error: KafkaError, reason: &str) {
        let end = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end {
            tracing::warn!(%error, reason, "route: reading an output topic");
        }
    }
}

impl ConsumerContext for TailReader {}

/// Metadata, watermarks and tail reads for output topics (one client, used from a blocking
/// thread: librdkafka's calls here block).
pub(crate) struct OutputTopics {
    /// Metadata and watermarks.
    reader: BaseConsumer,
    /// The settings of a tail reader (one per read).
    scan_config: ClientConfig,
    admin: AdminClient<DefaultClientContext>,
    policy: MissingTopic,
    replication: i32,
    /// Partition counts of topics known to exist.
    partitions: HashMap<String, i32>,
}

/// A record found in an output partition: which filter routed which source offset there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Routed {
    pub filter: String,
    pub offset: i64,
}

impl OutputTopics {
    pub fn new(kafka: &KafkaConfig, routes: &RoutesConfig) -> Result<Self, SinkError> {
        let mut cc = client_config(kafka);
        cc.set("group.id", format!("{}-route-reader", kafka.group_id))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest");
        let reader = cc
            .create()
            .map_err(kafka_err("creating the output reader"))?;
        // A tail read ends at the partition's end: the broker must answer an empty fetch at
        // once, not hold it for librdkafka's 500 ms default (one wait per partition read).
        cc.set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "10");
        Ok(Self {
            reader,
            scan_config: cc,
            admin: client_config(kafka)
                .create()
                .map_err(kafka_err("creating the admin client"))?,
            policy: routes.missing_topic,
            replication: routes.replication_factor,
            partitions: HashMap::new(),
        })
    }

    /// The partition count of `topic`, if it exists.
    fn describe(&self, topic: &str) -> Result<Option<i32>, SinkError> {
        let md = self
            .reader
            .fetch_metadata(Some(topic), TIMEOUT)
            .map_err(kafka_err(format!("reading the metadata of {topic}")))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32))
    }

    /// Makes sure `topic` exists (created with `partitions` partitions, if the policy allows)
    /// and returns its partition count.
    pub fn ensure(&mut self, topic: &str, partitions: i32) -> Result<i32, SinkError> {
        if let Some(n) = self.partitions.get(topic) {
            return Ok(*n);
        }
        let n = match self.describe(topic)? {
            Some(n) => n,
            None if self.policy == MissingTopic::Error => {
                return Err(SinkError::Mapping {
                    target: NAME,
                    reason: format!(
                        "output topic {topic} does not exist and routes.missing_topic is \"error\": create it, or set missing_topic = \"create\""
                    ),
                })
            }
            None => {
                self.create(topic, partitions)?;
                tracing::info!(topic, partitions, "route: created output topic");
                self.describe(topic)?.unwrap_or(partitions)
            }
        };
        self.partitions.insert(topic.to_string(), n);
        Ok(n)
    }

    fn create(&self, topic: &str, partitions: i32) -> Result<(), SinkError> {
        let new = NewTopic::new(
            topic,
            partitions.max(1),
            TopicReplication::Fixed(self.replication),
        );
        // Admin futures are driven by rdkafka's own thread; any executor can wait on them.
        let results = futures::executor::block_on(self.admin.create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(TIMEOUT)),
        ))
        .map_err(kafka_err(format!("creating output topic {topic}")))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(SinkError::Kafka {
                        sink: NAME,
                        context: format!("creating output topic {topic}"),
                        source: Box::new(KafkaError::AdminOp(code)),
                    })
                }
            }
        }
        Ok(())
    }

    /// The partition count of a source topic.
    pub fn source_partitions(&self, topic: &str) -> Result<i32, SinkError> {
        Ok(self.describe(topic)?.unwrap_or(1))
    }

    /// The offset the next record of an output partition will get.
    pub fn high_watermark(&self, topic: &str, partition: i32) -> Result<i64, SinkError> {
        let (_, high) = self
            .reader
            .fetch_watermarks(topic, partition, TIMEOUT)
            .map_err(kafka_err(format!(
                "reading the end of {topic}[{partition}]"
            )))?;
        Ok(high)
    }

    /// Every record of `source` that an output partition holds from offset `from` to its
    /// current end, by filter and source offset (from the records' headers).
    pub fn routed_since(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        source: &TopicPartition,
    ) -> Result<Vec<Routed>, SinkError> {
        let err = |what: &str| kafka_err(format!("{what} {topic}[{partition}]"));
        let (low, high) = self
            .reader
            .fetch_watermarks(topic, partition, TIMEOUT)
            .map_err(err("reading the watermarks of"))?;
        let start = from.max(low);
        let mut found = Vec::new();
        // A consumer of its own per read, so no event of an earlier read is taken for this
        // one's end.
        let reader: BaseConsumer<TailReader> = self
            .scan_config
            .create_with_context(TailReader)
            .map_err(err("creating a reader for"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))
            .map_err(err("positioning on"))?;
        reader.assign(&tpl).map_err(err("assigning"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut next = start;
        // The end is where the broker says there is nothing more (partition EOF), at or past
        // the high watermark read first: the dev broker reports a high watermark short of the
        // last batch's end until the next batch arrives (docs/routing.md), so the watermark
        // alone would stop before the records a crashed batch left.
        loop {
            if std::time::Instant::now() > deadline {
                return Err(SinkError::Kafka {
                    sink: NAME,
                    context: format!(
                        "reading {topic}[{partition}] from {start} past {high}: stalled at {next}"
                    ),
                    source: Box::new(KafkaError::PartitionEOF(partition)),
                });
            }
            match reader.poll(Duration::from_millis(500)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(_))) if next >= high => break,
                Some(Err(KafkaError::PartitionEOF(_))) => continue,
                Some(Err(e)) => return Err(err("reading")(e)),
                Some(Ok(m)) => {
                    next = m.offset() + 1;
                    let Some(headers) = m.headers() else { continue };
                    let header = |name: &str| {
                        headers
                            .iter()
                            .find(|h| h.key == name)
                            .and_then(|h| h.value)
                            .and_then(|v| std::str::from_utf8(v).ok())
                    };
                    let from_source = header(HEADER_TOPIC) == Some(source.topic.as_str())
                        && header(HEADER_PARTITION).and_then(|p| p.parse().ok())
                            == Some(source.partition);
                    if let (true, Some(filter), Some(offset)) = (
                        from_source,
                        header(HEADER_FILTER),
                        header(HEADER_OFFSET).and_then(|o| o.parse().ok()),
                    ) {
                        found.push(Routed {
                            filter: filter.to_string(),
                            offset,
                        });
                    }
                }
            }
        }
        Ok(found)
    }
}
