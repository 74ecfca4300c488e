//! `cdc-lake rejects`: the records no sink could take, with their reasons, and a way to
//! reprocess them once the cause is fixed.
//!
//! - `decode` rejects (not a Debezium envelope, bad JSON, corrupt Avro or an id the registry
//!   did not know, …) are decoded again from the bytes kept in `cdc_rejects`, in the configured
//!   format (`kafka.format`, with the registry for Avro); those that decode now go to the raw
//!   log (their reject row is deleted in the same transaction) and to every enabled state
//!   target.
//! - `state` rejects (a value the mirror column cannot hold) are applied again to the
//!   `processed` target, e.g. after the column type was widened; applied ones are deleted.
//!
//! Reprocessing is idempotent: state applies carry the ordering guard, and the raw insert and
//! the reject's removal commit together. Reprocessed decode rejects are not written to the lake
//! (its files are immutable); `cdc-replay --source raw` covers them.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::batch::Batch;
use crate::config::{Config, ConfigError, PROCESSED_TARGET};
use crate::db::ConnectError;
use crate::domain::KafkaCoordinates;
use crate::envelope::Decoded;
use crate::sink::raw::RawSink;
use crate::sink::state::StateSink;
use crate::sink::SinkError;
use crate::source::{RecordDecoder, RegistryUnavailable};

/// Why a `rejects` command stopped.
#[derive(Debug, thiserror::Error)]
pub enum RejectsError {
    /// The arguments are wrong; nothing was read (the binary exits 2).
    #[error("{0}")]
    BadArguments(String),
    #[error("{what}")]
    Postgres {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The configured record format cannot be decoded (no registry for Avro).
    #[error("{0}")]
    Decoder(String),
    /// A reject names a writer schema the registry cannot serve now: nothing was changed for
    /// it, and a rerun once the registry answers takes it up.
    #[error(transparent)]
    Registry(#[from] RegistryUnavailable),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

fn postgres(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> RejectsError {
    move |source| RejectsError::Postgres { what, source }
}

/// Which rejects a command works on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RejectFilter {
    /// Only this stage: decode, raw, state, state:<target> or route:<filter>.
    #[arg(long)]
    pub stage: Option<String>,
    /// Only rejects whose reason contains this text.
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this topic.
    #[arg(long)]
    pub topic: Option<String>,
}

impl RejectFilter {
    fn validate(&self) -> Result<(), RejectsError> {
        if let Some(s) = &self.stage {
            if !matches!(s.as_str(), "decode" | "raw" | "state")
                && !s.starts_with("state:")
                && !s.starts_with("route:")
            {
                return Err(RejectsError::BadArguments(format!(
                    "--stage is decode, raw, state, state:<target> or route:<filter>, not {s:?}"
                )));
            }
        }
        Ok(())
    }
}

const FILTER: &str = "($1::text IS NULL OR stage = $1)
    AND ($2::text IS NULL OR strpos(reason, $2) > 0)
    AND ($3::text IS NULL OR kafka_topic = $3)";

/// One stored reject.
#[derive(Debug, Clone)]
pub struct StoredReject {
    pub coords: KafkaCoordinates,
    pub stage: String,
    pub reason: String,
    pub rejected_at: DateTime<Utc>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

async fn load(
    client: &tokio_postgres::Client,
    filter: &RejectFilter,
    limit: i64,
) -> Result<Vec<StoredReject>, RejectsError> {
    let rows = client
        .query(
            &format!(
                "SELECT kafka_topic, kafka_partition, kafka_offset,
                        (extract(epoch FROM kafka_timestamp) * 1000)::bigint,
                        stage, reason, rejected_at, raw_key, raw_value
                   FROM cdc_raw.cdc_rejects WHERE {FILTER}
                  ORDER BY kafka_topic, kafka_partition, kafka_offset, stage LIMIT $4"
            ),
            &[&filter.stage, &filter.reason, &filter.topic, &limit],
        )
        .await
        .map_err(postgres("reading cdc_raw.cdc_rejects"))?;
    Ok(rows
        .iter()
        .map(|r| StoredReject {
            coords: KafkaCoordinates {
                topic: r.get(0),
                partition: r.get(1),
                offset: r.get(2),
                timestamp_ms: r.get(3),
            },
            stage: r.get(4),
            reason: r.get(5),
            rejected_at: r.get(6),
            key: r.get(7),
            value: r.get(8),
        })
        .collect())
}

/// Rejects per (stage, reason), most frequent first.
pub async fn counts(
    config: &Config,
    filter: &RejectFilter,
) -> Result<Vec<(String, String, i64)>, RejectsError> {
    filter.validate()?;
    let client = crate::db::connect(&config.postgres, "cdc-lake rejects").await?;
    let rows = client
        .query(
            &format!(
                "SELECT stage, reason, count(*) FROM cdc_raw.cdc_rejects WHERE {FILTER}
                  GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2"
            ),
            &[&filter.stage, &filter.reason, &filter.topic],
        )
        .await
        .map_err(postgres("counting cdc_raw.cdc_rejects"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// The first `limit` rejects in Kafka order.
pub async fn list(
    config: &Config,
    filter: &RejectFilter,
    limit: i64,
) -> Result<Vec<StoredReject>, RejectsError> {
    filter.validate()?;
    let client = crate::db::connect(&config.postgres, "cdc-lake rejects").await?;
    load(&client, filter, limit).await
}

/// What a reprocess did.
#[derive(Debug, Default)]
pub struct ReprocessReport {
    pub examined: u64,
    /// Decode rejects now in the raw log (and applied to the state targets).
    pub recovered_decode: u64,
    /// State rejects now applied to the processed target.
    pub recovered_state: u64,
    /// Still rejected, with the current reason (first few).
    pub still_rejected: BTreeMap<String, u64>,
}

/// Decodes a stored reject again, in the configured format (an Avro record's writer schema
/// comes from the registry, which may know it by now).
fn redecode(decoder: &mut RecordDecoder, r: &StoredReject) -> Result<Decoded, RegistryUnavailable> {
    // The registry client blocks on its requests.
    tokio::task::block_in_place(|| {
        decoder.decode_parts(r.coords.clone(), r.key.as_deref(), r.value.as_deref())
    })
}

/// Reprocesses the selected rejects (all of them, in Kafka order). With `dry_run`, only
/// reports what decodes now; writes nothing.
pub async fn reprocess(
    config: &Config,
    filter: &RejectFilter,
    dry_run: bool,
) -> Result<ReprocessReport, RejectsError> {
    filter.validate()?;
    let client = crate::db::connect(&config.postgres, "cdc-lake rejects").await?;
    let rejects = load(&client, filter, i64::MAX).await?;
    let mut report = ReprocessReport::default();
    let mut decoder = RecordDecoder::new(&config.kafka, tokio::runtime::Handle::current())
        .map_err(RejectsError::Decoder)?;
    let mut raw = RawSink::new(
        config.postgres.clone(),
        config.kafka.checkpoint_name().to_string(),
    );
    let consumer = config.kafka.checkpoint_name().to_string();
    let mut targets: Vec<StateSink> = config
        .all_targets()
        .iter()
        .filter(|t| t.state.enabled)
        .map(|t| StateSink::for_target(t, consumer.clone()))
        .collect();
    let processed = config.target(PROCESSED_TARGET)?;
    let mut processed_sink = StateSink::for_target(&processed, consumer.clone());

    for r in rejects {
        report.examined += 1;
        if r.stage != "decode" && r.stage != "state" {
            // Raw-stage rejects cannot enter the raw log as decoded (a NUL, an out-of-range
            // timestamp) and mapped targets' rejects are rebuilt with cdc-replay: both stay
            // where they are, bytes and reason intact.
            *report
                .still_rejected
                .entry(format!(
                    "stage {}: not reprocessed here (kept with its exact bytes)",
                    r.stage
                ))
                .or_default() += 1;
            continue;
        }
        let decoded = redecode(&mut decoder, &r)?;
        let change = match decoded {
            Decoded::Change(e) => e,
            Decoded::Reject(rej) => {
                *report.still_rejected.entry(rej.reason).or_default() += 1;
                continue;
            }
            Decoded::Skip(_, reason) => {
                *report
                    .still_rejected
                    .entry(format!("now a counted skip ({})", reason.as_str()))
                    .or_default() += 1;
                continue;
            }
        };
        if dry_run {
            match r.stage.as_str() {
                "decode" => report.recovered_decode += 1,
                _ => report.recovered_state += 1,
            }
            continue;
        }
        let batch = Batch {
            records: vec![Decoded::Change(Arc::clone(&change))],
            ..Batch::default()
        };
        if r.stage == "decode" {
            // State first (idempotent): if the raw insert then fails, a rerun applies again.
            for t in &mut targets {
                t.apply_replay(&batch).await?;
            }
            raw.store_reprocessed(&batch).await?;
            report.recovered_decode += 1;
        } else {
            let stats = processed_sink.apply_replay(&batch).await?;
            if stats.written == 1 {
                client
                    .execute(
                        "DELETE FROM cdc_raw.cdc_rejects
                          WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset = $3
                            AND stage = 'state'",
                        &[&r.coords.topic, &r.coords.partition, &r.coords.offset],
                    )
                    .await
                    .map_err(postgres("deleting a reprocessed reject"))?;
                report.recovered_state += 1;
            } else {
                // Rejected again: apply_replay recorded the reason; read it back.
                let reason: String = client
                    .query_one(
                        "SELECT reason FROM cdc_raw.cdc_rejects
                          WHERE kafka_topic = $1 AND kafka_partition = $2 AND kafka_offset = $3
                            AND stage = 'state'",
                        &[&r.coords.topic, &r.coords.partition, &r.coords.offset],
                    )
                    .await
                    .map(|row| row.get(0))
                    .unwrap_or(r.reason.clone());
                *report.still_rejected.entry(reason).or_default() += 1;
            }
        }
    }
    Ok(report)
}

/// `cdc-lake rejects` actions.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RejectsAction {
    /// Counts per stage and reason, most frequent first.
    Counts(RejectFilter),
    /// The rejects in Kafka order: coordinates, stage, when, reason and the record's first bytes.
    List {
        #[command(flatten)]
        filter: RejectFilter,
        /// How many to show.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Decode (stage decode) or apply (stage state) the rejects again once the cause is fixed;
    /// those that go through leave the rejects table.
    Reprocess {
        #[command(flatten)]
        filter: RejectFilter,
        /// Report what would go through; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// A printable preview of a record's bytes.
fn preview(bytes: Option<&[u8]>) -> String {
    match bytes {
        None => "(null)".into(),
        Some(b) => {
            let text = String::from_utf8_lossy(&b[..b.len().min(80)]).replace('\n', " ");
            if b.len() > 80 {
                format!("{text}…")
            } else {
                text
            }
        }
    }
}

/// Runs `cdc-lake rejects …` and prints the result on stdout.
pub async fn cli(
    config: &Config,
    action: &RejectsAction,
) -> Result<std::process::ExitCode, RejectsError> {
    match action {
        RejectsAction::Counts(filter) => {
            let rows = counts(config, filter).await?;
            let total: i64 = rows.iter().map(|r| r.2).sum();
            for (stage, reason, n) in &rows {
                println!("{n:>8}  {stage:<6}  {reason}");
            }
            println!("{total:>8}  rejects in all");
        }
        RejectsAction::List { filter, limit } => {
            for r in list(config, filter, *limit).await? {
                println!(
                    "{}[{}]@{}  {}  {}  {}\n    value: {}",
                    r.coords.topic,
                    r.coords.partition,
                    r.coords.offset,
                    r.stage,
                    r.rejected_at.format("%Y-%m-%d %H:%M:%S"),
                    r.reason,
                    preview(r.value.as_deref())
                );
            }
        }
        RejectsAction::Reprocess { filter, dry_run } => {
            let report = reprocess(config, filter, *dry_run).await?;
            let verb = if *dry_run {
                "would recover"
            } else {
                "recovered"
            };
            println!(
                "examined {}: {verb} {} decode and {} state rejects; {} still rejected",
                report.examined,
                report.recovered_decode,
                report.recovered_state,
                report.still_rejected.values().sum::<u64>()
            );
            for (reason, n) in &report.still_rejected {
                println!("{n:>8}  still: {reason}");
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
