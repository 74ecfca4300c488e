//! The opened source of a replay (raw log or lake): planning a selection and reading it.

use std::sync::Arc;

use super::error::{Context, ReplayError, ReplayResult};
use object_store::ObjectStore;

use super::source::{self, Plan};
use super::{Selection, SourceKind};
use crate::config::Config;
use crate::domain::TopicPartition;
use crate::sink::lake::manifest::Layout;

/// The opened source of a replay.
pub enum Reader {
    Raw(tokio_postgres::Client),
    Lake {
        store: Arc<dyn ObjectStore>,
        layout: Layout,
        prefix: String,
    },
}

impl Reader {
    pub async fn open(config: &Config, kind: SourceKind) -> ReplayResult<Self> {
        Ok(match kind {
            SourceKind::Raw => Reader::Raw(
                crate::db::connect(&config.postgres, "cdc-replay reader")
                    .await
                    .context("opening the raw log")?,
            ),
            SourceKind::Lake => {
                if !config.lake.enabled {
                    return Err(ReplayError::Refused(
                        "--source lake needs the [lake] section enabled in the config".into(),
                    ));
                }
                let (store, _) = crate::sink::lake::open_store(&config.lake)?;
                Reader::Lake {
                    store,
                    layout: Layout::new(&config.lake.prefix),
                    prefix: config.lake.prefix.clone(),
                }
            }
        })
    }

    /// What the selection covers.
    pub async fn plan(&self, sel: &Selection) -> ReplayResult<Plan> {
        match self {
            Reader::Raw(client) => source::plan_raw(client, sel).await,
            Reader::Lake {
                store,
                layout,
                prefix,
            } => Ok(source::plan_lake(
                &source::lake_commits(&**store, layout, prefix, sel).await?,
            )),
        }
    }

    /// The next offset of `tp` this source has accounted for, stored or not: the raw sink's
    /// checkpoint, or the end of the lake's last commit. Records a sink skips by design
    /// (tombstones, heartbeats) leave offsets below it that no replay will ever find.
    pub async fn covered(&self, config: &Config, tp: &TopicPartition) -> ReplayResult<i64> {
        match self {
            Reader::Raw(client) => Ok(client
                .query_opt(
                    "SELECT next_offset FROM cdc_lake.checkpoints
                      WHERE sink = 'raw' AND consumer = $1 AND kafka_topic = $2 AND kafka_partition = $3",
                    &[&config.kafka.checkpoint_name(), &tp.topic, &tp.partition],
                )
                .await
                .context("reading the raw log's checkpoint")?
                .map_or(0, |r| r.get(0))),
            Reader::Lake {
                store,
                layout,
                prefix,
            } => {
                let sel = Selection {
                    topic: Some(tp.topic.clone()),
                    partition: Some(tp.partition),
                    ..Selection::default()
                };
                Ok(source::lake_commits(&**store, layout, prefix, &sel)
                    .await?
                    .iter()
                    .map(|c| c.next_offset)
                    .max()
                    .unwrap_or(0))
            }
        }
    }

    /// Streams the selection in replay order. The raw reader opens its own connections.
    pub async fn read(&self, config: &Config, sel: &Selection) -> ReplayResult<source::Chunks> {
        match self {
            Reader::Raw(_) => source::read_raw(&config.postgres, sel.clone()).await,
            Reader::Lake {
                store,
                layout,
                prefix,
            } => {
                let commits = source::lake_commits(&**store, layout, prefix, sel).await?;
                Ok(source::read_lake(store.clone(), commits, sel.clone()))
            }
        }
    }
}
