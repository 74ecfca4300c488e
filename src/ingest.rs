//! Wires the ingest pod together: sinks, HTTP, the source thread and the pipeline, with
//! shutdown on SIGTERM/SIGINT.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{ConnectError, DbError};
use crate::pipeline::{AnySink, Pipeline, Readiness, UnfinishedSinks};
use crate::sink::lake::LakeSink;
use crate::sink::raw::RawSink;
use crate::sink::route::RouteSink;
use crate::sink::state::StateSink;
use crate::sink::SinkError;
use crate::source::{KafkaConsumer, RecordDecoder};

/// Why the pod (or `migrate`) stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Migrate(#[from] DbError),
    /// A target's mappings or setup SQL do not fit its database.
    #[error("invalid mapping: {0}")]
    InvalidMapping(SinkError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("cannot listen on {listen}: {error}")]
    Listen {
        listen: String,
        error: std::io::Error,
    },
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The record decoder's settings (the format, the registry) do not work.
    #[error("{0}")]
    Decoder(String),
    #[error("cannot start the poll thread: {0}")]
    PollThread(std::io::Error),
    #[error(transparent)]
    Unfinished(#[from] UnfinishedSinks),
    /// `routes.yaml` has mistakes (each with file, line and filter).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Routes(Vec<crate::route::RouteError>),
}

/// Builds the enabled sinks, in a fixed order: raw, lake, then each state target.
pub fn build_sinks(config: &Config) -> Result<Vec<AnySink>, IngestError> {
    let consumer = config.kafka.checkpoint_name().to_string();
    let mut sinks = Vec::new();
    if config.raw.enabled {
        sinks.push(AnySink::Raw(RawSink::new(
            config.postgres.clone(),
            consumer.clone(),
        )));
    }
    if config.lake.enabled {
        let lake = LakeSink::new(&config.lake)?;
        tracing::info!(location = lake.location(), "lake sink");
        sinks.push(AnySink::Lake(lake));
    }
    for target in config.all_targets() {
        if target.state.enabled {
            sinks.push(AnySink::State(StateSink::for_target(
                &target,
                consumer.clone(),
            )));
        }
    }
    if config.routes.enabled() {
        let routes = crate::route::Routes::load(std::path::Path::new(&config.routes.file))
            .map_err(IngestError::Routes)?;
        routes
            .check_avro_output(
                config.kafka.format.reads_avro(),
                config.kafka.schema_registry.is_some(),
            )
            .map_err(IngestError::Routes)?;
        tracing::info!(file = %config.routes.file, filters = routes.filters.len(), "route sink");
        sinks.push(AnySink::Route(RouteSink::new(
            Arc::new(routes),
            &config.kafka,
            &config.routes,
            config.postgres.clone(),
            consumer,
        )?));
    }
    Ok(sinks)
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn termination_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
}

/// `cdc-lake migrate`: the schema migrations, then each mapped target opened (its setup SQL
/// run, its mappings checked), so that an init container fails on a mapping that does not fit.
/// Returns what the sink database got.
pub async fn migrate(config: &Config) -> Result<Vec<i32>, IngestError> {
    let applied = migrate_databases(config).await?;
    for target in config.all_targets() {
        if !target.mappings.is_empty() {
            StateSink::for_target(&target, config.kafka.checkpoint_name().to_string())
                .prepare()
                .await
                .map_err(invalid_mapping)?;
        }
    }
    Ok(applied)
}

/// Applies pending migrations to the sink database and to each target's database (every
/// database that holds data also holds its checkpoints). Returns what the sink database got.
async fn migrate_databases(config: &Config) -> Result<Vec<i32>, IngestError> {
    let mut client = crate::db::connect(&config.postgres, "cdc-lake migrate").await?;
    let applied = crate::db::migrate(&mut client).await?;
    for target in config.all_targets() {
        if target.postgres.url != config.postgres.url {
            let mut client = crate::db::connect(&target.postgres, "cdc-lake migrate").await?;
            crate::db::migrate(&mut client).await?;
        }
    }
    Ok(applied)
}

/// A target that cannot be opened because of its mappings or setup SQL reads as such.
fn invalid_mapping(e: SinkError) -> IngestError {
    match e {
        SinkError::Mapping { .. } => IngestError::InvalidMapping(e),
        other => other.into(),
    }
}

/// How long a stopping pod waits to leave its consumer group. Leaving lets the next owner take
/// the partitions without waiting for the session timeout, but it waits on the broker's group
/// coordinator, which can stall (`../shared/ENVIRONMENT.md`). Every checkpoint is stored by
/// then, so nothing depends on it and the pod stops anyway.
const LEAVE_GROUP_LIMIT: Duration = Duration::from_secs(10);

/// Joins the poll thread and drops the last consumer handle, which leaves the group, on a
/// thread of its own: a coordinator that does not answer cannot hold the stopping pod (nor,
/// as a blocking task would, the runtime's shutdown).
async fn leave_group(poll_thread: std::thread::JoinHandle<()>, consumer: Arc<KafkaConsumer>) {
    let (left_tx, left_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("kafka-leave".into())
        .spawn(move || {
            let _ = poll_thread.join();
            drop(consumer);
            let _ = left_tx.send(());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a thread to leave the consumer group");
        return;
    }
    if tokio::time::timeout(LEAVE_GROUP_LIMIT, left_rx)
        .await
        .is_err()
    {
        tracing::warn!(
            limit = ?LEAVE_GROUP_LIMIT,
            "leaving the consumer group did not finish in time; stopping without waiting"
        );
    }
}

/// Runs the ingest pod until `shutdown` fires, then drains within the configured deadline.
/// Pending migrations are applied first unless `skip_migrations`.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    skip_migrations: bool,
) -> Result<(), IngestError> {
    if !skip_migrations {
        // The pod opens its own targets below, so their setup SQL runs once.
        migrate_databases(&config).await?;
    }
    let readiness = Readiness::default();
    let http = if config.http.listen.is_empty() {
        None
    } else {
        Some(
            crate::http::serve(&config.http.listen, readiness.clone(), shutdown.clone())
                .await
                .map_err(|error| IngestError::Listen {
                    listen: config.http.listen.clone(),
                    error,
                })?,
        )
    };
    let mut sinks = build_sinks(&config)?;
    // Setup SQL and mappings are checked before consuming: a mapping that does not fit its
    // target stops start-up with a message naming it, instead of a pod that retries forever.
    for sink in &mut sinks {
        if let AnySink::State(state) = sink {
            match state.prepare().await {
                Err(e @ SinkError::Mapping { .. }) => return Err(invalid_mapping(e)),
                // Unreachable database: the pipeline's retries and readiness handle it.
                Err(e) => tracing::warn!(error = %e, "cannot open a state target yet; will retry"),
                Ok(()) => {}
            }
        }
    }

    let (tx, rx) = mpsc::channel(4);
    let deadline = config.shutdown.drain_deadline.0;
    let (consumer, closing) = crate::source::create_consumer(&config.kafka, tx.clone(), deadline)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let decoder = RecordDecoder::new(&config.kafka, tokio::runtime::Handle::current())
        .map_err(IngestError::Decoder)?;
    let poll_thread = {
        let (consumer, stop, readiness) = (consumer.clone(), stop.clone(), readiness.clone());
        // Chunks of up to 5,000 records, and a quarter of a batch's bytes: the queue of four
        // then holds about one batch (docs/performance.md, "Where a backlog's memory is").
        let chunk = crate::source::ChunkLimits {
            records: config.batch.max_records.clamp(100, 5000),
            bytes: usize::try_from(config.batch.max_bytes.0 / 4).unwrap_or(usize::MAX),
        };
        std::thread::Builder::new()
            .name("kafka-poll".into())
            // Decodes records: as deep as envelope::json allows.
            .stack_size(crate::envelope::json::THREAD_STACK_BYTES)
            .spawn(move || {
                crate::source::run_poll_loop(consumer, tx, stop, chunk, decoder, readiness)
            })
            .map_err(IngestError::PollThread)?
    };
    // When shutdown starts, stop fetching at once; the pipeline drains what it already has.
    {
        let (stop, closing, shutdown) = (stop.clone(), closing.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            closing.store(true, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
        });
    }
    let compaction = crate::compact::schedule::spawn(&config, &shutdown);
    readiness.set(true, "consumer started");
    tracing::info!(group = %config.kafka.group_id, topics = ?config.kafka.topics, "ingest running");

    let pipeline = Pipeline::new(
        sinks,
        crate::pipeline::KafkaBroker::new(consumer.clone(), &config.kafka),
        config.batch.clone(),
        readiness.clone(),
        shutdown.clone(),
    );
    let outcome = pipeline.run(rx, deadline).await;

    readiness.set(false, "shutting down");
    stop.store(true, Ordering::SeqCst);
    closing.store(true, Ordering::SeqCst);
    leave_group(poll_thread, consumer).await;
    shutdown.cancel();
    if let Some(task) = compaction {
        crate::compact::schedule::finish(task, deadline).await;
    }
    if let Some(h) = http {
        let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
    }
    outcome.map_err(Into::into)
}
