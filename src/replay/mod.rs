//! `cdc-replay`: rebuilds a current-state target from the raw log or the lake, with the same
//! apply code (and ordering guard) as the ingest pod, so a rebuilt target equals a live-built one.
//!
//! Also here: `verify` (recompute a target from the log and compare) and `prune-raw` (delete
//! raw-log rows the lake manifest proves are in the lake).

pub mod compare;
pub mod prune;
pub mod source;

use std::collections::BTreeSet;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, NaiveDateTime, Utc};
use object_store::ObjectStore;

use crate::batch::Batch;
use crate::config::{Config, Target};
use crate::domain::{TableId, TopicPartition};
use crate::envelope::Decoded;
use crate::sink::ident::quote_ident;
use crate::sink::lake::manifest::Layout;
use crate::sink::state::{sources, StateSink};
use crate::sink::WriteStats;
use source::Plan;

/// A point in time to rebuild state as of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Changes the source committed at or before this time (`source.ts_ms`).
    Time(DateTime<Utc>),
    /// Changes at or before this source LSN.
    Lsn(i64),
}

impl std::str::FromStr for Until {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some((hi, lo)) = s.split_once('/') {
            let hi = u32::from_str_radix(hi, 16);
            let lo = u32::from_str_radix(lo, 16);
            if let (Ok(hi), Ok(lo)) = (hi, lo) {
                return Ok(Until::Lsn(((i64::from(hi)) << 32) | i64::from(lo)));
            }
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map(Until::Lsn).map_err(|e| e.to_string());
        }
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Ok(Until::Time(t.with_timezone(&Utc)));
        }
        for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
            if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
                return Ok(Until::Time(t.and_utc()));
            }
        }
        Err(format!(
            "{s:?} is neither a timestamp (2026-11-21T09:30:00Z, or UTC 2026-11-21 09:30:00) nor an LSN (0/16B3748 or a number)"
        ))
    }
}

impl fmt::Display for Until {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Until::Time(t) => write!(f, "{}", t.to_rfc3339()),
            Until::Lsn(l) => write!(f, "{:X}/{:X}", l >> 32, l & 0xFFFF_FFFF),
        }
    }
}

/// Which changes to replay.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub from_offset: i64,
    /// Last offset included.
    pub to_offset: Option<i64>,
    pub until: Option<Until>,
}

impl Selection {
    /// Checks the selection itself, before any I/O.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.from_offset < 0 {
            return crate::cli::bad_arguments(format!(
                "--from-offset must be 0 or more, not {}",
                self.from_offset
            ));
        }
        if let Some(to) = self.to_offset {
            if to < self.from_offset {
                return crate::cli::bad_arguments(format!(
                    "invalid range: --to-offset {to} is below --from-offset {}",
                    self.from_offset
                ));
            }
        }
        if self.partition.is_some_and(|p| p < 0) {
            return crate::cli::bad_arguments("--partition must be 0 or more");
        }
        if self.topic.as_ref().is_some_and(|t| t.trim().is_empty()) {
            return crate::cli::bad_arguments("--topic is empty");
        }
        Ok(())
    }

    /// Whether the range has an end: then a rebuilt target is deliberately behind the log.
    pub fn is_bounded(&self) -> bool {
        self.to_offset.is_some() || self.until.is_some()
    }

    pub fn until_time(&self) -> Option<DateTime<Utc>> {
        match self.until {
            Some(Until::Time(t)) => Some(t),
            _ => None,
        }
    }

    pub fn until_lsn(&self) -> Option<i64> {
        match self.until {
            Some(Until::Lsn(l)) => Some(l),
            _ => None,
        }
    }

    /// Whether a decoded record is selected (the lake filters after decoding).
    pub fn selects(&self, r: &Decoded) -> bool {
        let c = r.coords();
        if c.offset < self.from_offset
            || self.to_offset.is_some_and(|to| c.offset > to)
            || self.topic.as_ref().is_some_and(|t| *t != c.topic)
            || self.partition.is_some_and(|p| p != c.partition)
        {
            return false;
        }
        let Decoded::Change(e) = r else {
            return true;
        };
        match self.until {
            None => true,
            Some(Until::Time(t)) => e
                .event_time_ms()
                .is_none_or(|ms| ms <= t.timestamp_millis()),
            Some(Until::Lsn(l)) => e.source.lsn.is_none_or(|lsn| lsn <= l),
        }
    }
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "offsets {}..", self.from_offset)?;
        if let Some(to) = self.to_offset {
            write!(f, "={to}")?;
        }
        if let Some(t) = &self.topic {
            write!(f, " of topic {t}")?;
        }
        if let Some(p) = self.partition {
            write!(f, " partition {p}")?;
        }
        if let Some(u) = &self.until {
            write!(f, " until {u}")?;
        }
        Ok(())
    }
}

/// Where a replay reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// The PostgreSQL audit log `cdc_raw.cdc_events`.
    Raw,
    /// The lake's Parquet files (when raw retention has dropped old rows).
    Lake,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Raw => "raw log",
            SourceKind::Lake => "lake",
        })
    }
}

/// `cdc-replay` / `cdc-lake replay` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// First Kafka offset to replay (per partition).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub from_offset: i64,
    /// Last Kafka offset to replay (per partition), inclusive.
    #[arg(long, value_name = "M")]
    pub to_offset: Option<i64>,
    /// Only this topic.
    #[arg(long, value_name = "T")]
    pub topic: Option<String>,
    /// Only this partition.
    #[arg(long, value_name = "P")]
    pub partition: Option<i32>,
    /// Rebuild state as it was at this point: a timestamp (RFC 3339, or UTC
    /// "YYYY-MM-DD HH:MM:SS") or a source LSN (0/16B3748).
    #[arg(long, value_name = "TIMESTAMP|LSN")]
    pub until: Option<Until>,
    /// The target to write: "processed" ([state]) or a [targets.<name>] from the config.
    #[arg(long, default_value = crate::config::PROCESSED_TARGET)]
    pub target: String,
    /// Read from the raw log or from the lake.
    #[arg(long, value_enum, default_value_t = SourceKind::Raw)]
    pub source: SourceKind,
    /// Empty the target's tables for the selected source tables first.
    #[arg(long)]
    pub rebuild: bool,
    /// Print what would change (per table: rows inserted, updated, deleted) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Changes per apply transaction.
    #[arg(long, default_value_t = 10_000)]
    pub batch_size: usize,
}

impl ReplayArgs {
    pub fn selection(&self) -> Selection {
        Selection {
            topic: self.topic.clone(),
            partition: self.partition,
            from_offset: self.from_offset,
            to_offset: self.to_offset,
            until: self.until,
        }
    }
}

/// What a replay did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub events: u64,
    pub stats: WriteStats,
    pub elapsed: Duration,
    pub tables: BTreeSet<TableId>,
    /// For a dry run: the differences the replay would make.
    pub changes: Vec<compare::TableDiff>,
}

impl Summary {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "replayed {} changes in {:.1}s ({:.0} events/s): {} applied, {} not applied",
            self.events,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.stats.written,
            self.stats.ignored.values().sum::<u64>()
        )?;
        for (reason, n) in &self.stats.ignored {
            writeln!(f, "  not applied: {n} {reason}")?;
        }
        let tables: Vec<String> = self.tables.iter().map(ToString::to_string).collect();
        writeln!(f, "  source tables: {}", tables.join(", "))
    }
}

/// A progress line on stderr: a bar with rate and ETA when stderr is a terminal, a log line
/// every 10 s otherwise.
pub struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
    tty: bool,
    label: &'static str,
}

impl Progress {
    pub fn new(total: u64, label: &'static str) -> Self {
        let now = Instant::now();
        Self {
            total,
            done: 0,
            started: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
            label,
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        let every = if self.tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(10)
        };
        if self.last.elapsed() >= every {
            self.last = Instant::now();
            self.print();
        }
    }

    fn print(&self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = self.done as f64 / secs;
        let frac = (self.done as f64 / self.total.max(1) as f64).min(1.0);
        let eta = if rate > 0.0 {
            format!(
                "{:.0}s",
                (self.total.saturating_sub(self.done)) as f64 / rate
            )
        } else {
            "?".into()
        };
        let filled = (frac * 30.0) as usize;
        let line = format!(
            "{} [{}{}] {:>3.0}% {}/{} events  {:.0} events/s  ETA {eta}",
            self.label,
            "#".repeat(filled),
            "-".repeat(30 - filled),
            frac * 100.0,
            self.done,
            self.total,
            rate
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    pub fn finish(&self) {
        self.print();
        if self.tty {
            eprintln!();
        }
    }
}

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
    pub async fn open(config: &Config, kind: SourceKind) -> anyhow::Result<Self> {
        Ok(match kind {
            SourceKind::Raw => Reader::Raw(
                crate::db::connect(&config.postgres, "cdc-replay reader")
                    .await
                    .context("opening the raw log")?,
            ),
            SourceKind::Lake => {
                if !config.lake.enabled {
                    bail!("--source lake needs the [lake] section enabled in the config");
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
    pub async fn plan(&self, sel: &Selection) -> anyhow::Result<Plan> {
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
    pub async fn covered(&self, config: &Config, tp: &TopicPartition) -> anyhow::Result<i64> {
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

    /// Streams the selection in replay order. The raw reader needs its own connection.
    pub async fn read(&self, config: &Config, sel: &Selection) -> anyhow::Result<source::Chunks> {
        match self {
            Reader::Raw(_) => {
                let client = crate::db::connect(&config.postgres, "cdc-replay reader").await?;
                source::read_raw(client, sel.clone()).await
            }
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

/// Applies a planned selection with a progress bar; the summary counts what was applied.
pub async fn apply_plan(
    config: &Config,
    reader: &Reader,
    sel: &Selection,
    plan: &Plan,
    sink: &mut StateSink,
    batch_size: usize,
    label: &'static str,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut summary = Summary {
        tables: plan.tables.clone(),
        ..Summary::default()
    };
    let mut progress = Progress::new(plan.events, label);
    apply_selection(
        config,
        reader,
        sel,
        sink,
        batch_size,
        &mut progress,
        &mut summary,
    )
    .await?;
    progress.finish();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Applies everything a reader streams for `sel` to `sink`, in batches.
pub async fn apply_selection(
    config: &Config,
    reader: &Reader,
    sel: &Selection,
    sink: &mut StateSink,
    batch_size: usize,
    progress: &mut Progress,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let mut chunks = reader.read(config, sel).await?;
    let mut batch = Batch::default();
    while let Some(chunk) = chunks.recv().await {
        let chunk = chunk?;
        summary.events += chunk.len() as u64;
        progress.add(chunk.len() as u64);
        batch.records.extend(chunk);
        if batch.len() >= batch_size {
            let full = std::mem::take(&mut batch);
            apply_batch(sink, &full, summary).await?;
        }
    }
    apply_batch(sink, &batch, summary).await
}

async fn apply_batch(
    sink: &mut StateSink,
    batch: &Batch,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    // A dependency hiccup is retried a few times; a replay is restartable anyway (idempotent).
    let mut attempt = 0;
    let stats = loop {
        match sink.apply_replay(batch).await {
            Ok(s) => break s,
            Err(e) if e.is_retryable() && attempt < 5 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "replay batch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    summary.stats.written += stats.written;
    for (k, v) in stats.ignored {
        *summary.stats.ignored.entry(k).or_default() += v;
    }
    Ok(())
}

/// Holds the replay lock of a target for as long as it lives (a session advisory lock, released
/// when the connection closes, even if the process dies).
pub struct TargetLock {
    _client: tokio_postgres::Client,
}

impl TargetLock {
    pub async fn acquire(target: &Target) -> anyhow::Result<Self> {
        let client = crate::db::connect(&target.postgres, "cdc-replay lock").await?;
        let key = format!("cdc-replay:{}", target.state.schema);
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock(hashtext($1)::bigint)", &[&key])
            .await?
            .get(0);
        if !got {
            bail!(
                "target {:?} ({}) is being replayed by another cdc-replay; wait for it to finish",
                target.name,
                target.state.schema
            );
        }
        Ok(Self { _client: client })
    }
}

/// Empties the target's mirrors of `tables` (those that exist), in one transaction.
async fn empty_mirrors(sink: &mut StateSink, tables: &BTreeSet<TableId>) -> anyhow::Result<u64> {
    let schema = sink.schema().to_string();
    // Opening the target runs its setup SQL and checks its mappings.
    sink.prepare().await?;
    // A mapped target is rebuilt whole: its tables, not the source tables' mirrors.
    let mapped = sink.mapped_table_names();
    let naming = sink.naming().clone();
    let client = sink.client().await?;
    let names: Vec<String> = if mapped.is_empty() {
        sources::mirror_names(client, &schema, &naming, tables).await?
    } else {
        mapped
    };
    let mut removed = 0u64;
    let tx = client.transaction().await?;
    for name in &names {
        let qualified = format!(
            "{}.{}",
            quote_ident(&schema).map_err(anyhow::Error::msg)?,
            quote_ident(name).map_err(anyhow::Error::msg)?
        );
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
            .await?
            .get(0);
        if exists {
            removed += tx
                .execute(&format!("DELETE FROM {qualified}"), &[])
                .await
                .with_context(|| format!("emptying {qualified}"))?;
        }
        // A rebuild replays the truncates again; an old watermark would hide earlier rows.
        tx.execute(
            "DELETE FROM cdc_lake.truncations WHERE target_schema = $1 AND mirror_table = $2",
            &[&schema, &name],
        )
        .await
        .with_context(|| format!("forgetting the truncates of {qualified}"))?;
    }
    tx.commit().await?;
    sink.forget_tables();
    Ok(removed)
}

/// Runs a replay: validate, plan, lock, (rebuild), apply, catch up, summarize.
pub async fn run(config: &Config, args: &ReplayArgs) -> anyhow::Result<Summary> {
    let sel = args.selection();
    sel.validate()?;
    if args.batch_size == 0 {
        return crate::cli::bad_arguments("--batch-size must be at least 1");
    }
    let target = config.target(&args.target)?;
    let reader = Reader::open(config, args.source).await?;
    let plan = reader.plan(&sel).await?;
    source::ensure_not_empty(&plan, &sel, &args.source.to_string())?;
    let _lock = TargetLock::acquire(&target).await?;
    // The target's database keeps rejects and checkpoints like any sink database.
    let mut admin = crate::db::connect(&target.postgres, "cdc-replay").await?;
    crate::db::migrate(&mut admin).await?;
    eprintln!(
        "cdc-replay: {} changes ({sel}) of {} partition(s) from the {} into target {:?} ({}){}",
        plan.events,
        plan.partitions.len(),
        args.source,
        target.name,
        target.state.schema,
        if args.dry_run { ", dry run" } else { "" }
    );

    if !target.mappings.is_empty() {
        if args.dry_run {
            bail!(
                "--dry-run compares mirrors; target {} is mapped (replay into a copy of it instead)",
                target.name
            );
        }
        if args.rebuild && (sel.topic.is_some() || sel.partition.is_some()) {
            bail!(
                "target {} is mapped and is rebuilt whole: drop --topic/--partition, or replay without --rebuild",
                target.name
            );
        }
    }
    if args.dry_run {
        return compare::dry_run(config, &target, &reader, &sel, &plan, args).await;
    }

    let mut sink = StateSink::for_target(&target, config.kafka.checkpoint_name().to_string());
    if args.rebuild {
        let removed = empty_mirrors(&mut sink, &plan.tables).await?;
        eprintln!("cdc-replay: --rebuild removed {removed} rows from the target's tables");
    }
    let started = Instant::now();
    let mut summary = apply_plan(
        config,
        &reader,
        &sel,
        &plan,
        &mut sink,
        args.batch_size,
        "replay",
    )
    .await?;

    if args.rebuild && !sel.is_bounded() {
        catch_up(
            &admin,
            config,
            &target,
            &reader,
            &sel,
            &plan,
            &mut sink,
            args,
            &mut summary,
        )
        .await?;
    } else if sel.is_bounded()
        && !target_checkpoints(&admin, &target, config)
            .await?
            .is_empty()
    {
        eprintln!(
            "cdc-replay: warning: target {:?} is also written by the ingest pod, which continues from its own checkpoint; \
             a bounded replay (--to-offset/--until) into it is overtaken by newer changes only as they arrive. \
             To look at a past state, replay into a separate target.",
            target.name
        );
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The ingest pod's checkpoints for a target (next offset per partition), read through
/// `client`: a connection to the target's database, or a transaction for a snapshot.
pub async fn target_checkpoints(
    client: &impl tokio_postgres::GenericClient,
    target: &Target,
    config: &Config,
) -> anyhow::Result<Vec<(TopicPartition, i64)>> {
    let rows = client
        .query(
            "SELECT kafka_topic, kafka_partition, next_offset FROM cdc_lake.checkpoints
              WHERE sink = $1 AND consumer = $2 ORDER BY 1, 2",
            &[&target.sink_name(), &config.kafka.checkpoint_name()],
        )
        .await
        .context("reading the target's checkpoints")?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                TopicPartition::new(r.get::<_, String>(0), r.get(1)),
                r.get(2),
            )
        })
        .collect())
}

/// After a full rebuild of a target the ingest pod also writes: the pod continues from its own
/// checkpoint, so the replay must reach it. Replays what the source gained since, partition by
/// partition, until every partition is covered (or the source stops growing).
#[allow(clippy::too_many_arguments)]
async fn catch_up(
    admin: &tokio_postgres::Client,
    config: &Config,
    target: &Target,
    reader: &Reader,
    sel: &Selection,
    plan: &Plan,
    sink: &mut StateSink,
    args: &ReplayArgs,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let mut replayed: std::collections::BTreeMap<TopicPartition, i64> = plan
        .partitions
        .iter()
        .map(|(tp, (_, last))| (tp.clone(), last + 1))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let behind: Vec<(TopicPartition, i64, i64)> = target_checkpoints(admin, target, config)
            .await?
            .into_iter()
            .filter(|(tp, _)| {
                sel.topic.as_ref().is_none_or(|t| *t == tp.topic)
                    && sel.partition.is_none_or(|p| p == tp.partition)
            })
            .filter_map(|(tp, next)| {
                let done = replayed.get(&tp).copied().unwrap_or(sel.from_offset);
                (done < next).then_some((tp, done, next))
            })
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        let mut progressed = false;
        for (tp, from, next) in &behind {
            let part = Selection {
                topic: Some(tp.topic.clone()),
                partition: Some(tp.partition),
                from_offset: *from,
                ..Selection::default()
            };
            let p = reader.plan(&part).await?;
            if p.partitions.is_empty() && reader.covered(config, tp).await? >= *next {
                // Only skipped records (a tombstone, say) between what was replayed and the
                // target's checkpoint: nothing more to apply.
                replayed.insert(tp.clone(), *next);
                progressed = true;
            } else if let Some((_, last)) = p.partitions.get(tp) {
                let mut progress = Progress::new(p.events, "catch-up");
                apply_selection(
                    config,
                    reader,
                    &part,
                    sink,
                    args.batch_size,
                    &mut progress,
                    summary,
                )
                .await?;
                replayed.insert(tp.clone(), last + 1);
                summary.tables.extend(p.tables);
                progressed = true;
            }
        }
        if !progressed {
            if Instant::now() > deadline {
                for (tp, from, next) in behind {
                    eprintln!(
                        "cdc-replay: warning: {tp}: the target's checkpoint is {next} but the {} reaches only {from}; \
                         run `cdc-replay --target {} --topic {} --partition {} --from-offset {from}` once it has caught up",
                        args.source, target.name, tp.topic, tp.partition
                    );
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// `cdc-lake verify` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The target to check: "processed" or a [targets.<name>].
    #[arg(long, default_value = crate::config::PROCESSED_TARGET)]
    pub target: String,
    /// Recompute from the raw log or from the lake.
    #[arg(long, value_enum, default_value_t = SourceKind::Raw)]
    pub source: SourceKind,
    /// Also compare each mirror with its table in this source database
    /// (postgres://user@host:port/db; exact only while the source is quiet).
    #[arg(long, value_name = "URL")]
    pub source_db: Option<String>,
}

/// `cdc-lake prune-raw` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct PruneArgs {
    /// Delete rows whose source commit time is before this (RFC 3339, or UTC
    /// "YYYY-MM-DD HH:MM:SS").
    #[arg(long, value_name = "TIMESTAMP")]
    pub before: String,
    /// Count what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Runs `cdc-replay` and prints the summary (and a dry run's changes) on stdout.
pub async fn cli_replay(
    config: &Config,
    args: &ReplayArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let summary = run(config, args).await?;
    print!("{summary}");
    for d in &summary.changes {
        println!(
            "{}",
            compare::Described {
                diff: d,
                dry_run: true
            }
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs `cdc-lake verify`: exit 0 when the target matches, 1 with the differences otherwise.
pub async fn cli_verify(
    config: &Config,
    args: &VerifyArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let target = config.target(&args.target)?;
    let reader = Reader::open(config, args.source).await?;
    let diffs = compare::verify(config, &target, &reader).await?;
    let bad: Vec<_> = diffs.iter().filter(|d| !d.is_empty()).collect();
    for d in &bad {
        println!(
            "{}",
            compare::Described {
                diff: d,
                dry_run: false
            }
        );
    }
    let mut source_differs = false;
    if let Some(url) = &args.source_db {
        let tables = reader.plan(&Selection::default()).await?.tables;
        for (d, skipped) in compare::compare_with_source(&target, url, &tables).await? {
            if d.is_empty() {
                println!("{}: matches the source database", d.table);
            } else {
                source_differs = true;
                let described = compare::Described {
                    diff: &d,
                    dry_run: false,
                };
                println!("source database: {described}");
            }
            if !skipped.is_empty() {
                println!("  not compared: {}", skipped.join(", "));
            }
        }
    }
    if bad.is_empty() && !source_differs {
        println!(
            "target {:?}: {} table(s) match the {}",
            target.name,
            diffs.len(),
            args.source
        );
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        println!(
            "target {:?}: {} of {} table(s) differ from the {}{}",
            target.name,
            bad.len(),
            diffs.len(),
            args.source,
            if source_differs {
                "; the source database differs"
            } else {
                ""
            }
        );
        Ok(std::process::ExitCode::FAILURE)
    }
}

/// Runs `cdc-lake prune-raw`.
pub async fn cli_prune(
    config: &Config,
    args: &PruneArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let before = match args.before.parse::<Until>().map_err(anyhow::Error::msg)? {
        Until::Time(t) => t,
        Until::Lsn(_) => bail!("--before takes a time, not an LSN"),
    };
    let report = prune::prune_raw(config, before, args.dry_run).await?;
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    for (tp, ((first, next), n)) in &report.partitions {
        println!("{tp}: lake holds offsets {first}..{next}; {verb} {n} raw rows");
    }
    for tp in &report.unproven {
        println!("{tp}: no lake manifest; kept every raw row");
    }
    println!(
        "{verb} {} raw rows older than {}",
        report.deleted(),
        before.to_rfc3339()
    );
    Ok(std::process::ExitCode::SUCCESS)
}
