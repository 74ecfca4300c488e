//! Rebuilding a target: lock it, empty what is rebuilt, apply the selection in batches, catch
//! up to the live checkpoints.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::error::{Context, ReplayError, ReplayResult};

use super::source::{self, Plan};
use super::{compare, Progress, Reader, ReplayArgs, Selection, Summary};
use crate::batch::Batch;
use crate::config::{Config, Target};
use crate::domain::{TableId, TopicPartition};
use crate::sink::state::{sources, StateSink};

/// Applies a planned selection with a progress bar; the summary counts what was applied.
pub async fn apply_plan(
    config: &Config,
    reader: &Reader,
    sel: &Selection,
    plan: &Plan,
    sink: &mut StateSink,
    batch_size: usize,
    label: &'static str,
) -> ReplayResult<Summary> {
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
) -> ReplayResult<()> {
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
            // Freeing it here would keep the target's connection idle meanwhile.
            crate::batch::drop_in_background(full);
        }
    }
    apply_batch(sink, &batch, summary).await
}

async fn apply_batch(
    sink: &mut StateSink,
    batch: &Batch,
    summary: &mut Summary,
) -> ReplayResult<()> {
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
    pub async fn acquire(target: &Target) -> ReplayResult<Self> {
        let client = crate::db::connect(&target.postgres, "cdc-replay lock").await?;
        let key = format!("cdc-replay:{}", target.state.schema);
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock(hashtext($1)::bigint)", &[&key])
            .await?
            .get(0);
        if !got {
            return Err(ReplayError::Refused(format!(
                "target {:?} ({}) is being replayed by another cdc-replay; wait for it to finish",
                target.name, target.state.schema
            )));
        }
        Ok(Self { _client: client })
    }
}

/// Empties the target's mirrors of `tables` (those that exist), in one transaction.
async fn empty_mirrors(sink: &mut StateSink, tables: &BTreeSet<TableId>) -> ReplayResult<u64> {
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
        let qualified = format!("{}.{}", compare::q(&schema)?, compare::q(name)?);
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
pub async fn run(config: &Config, args: &ReplayArgs) -> ReplayResult<Summary> {
    let sel = args.selection();
    sel.validate()?;
    if args.batch_size == 0 {
        return Err(ReplayError::BadArguments(
            "--batch-size must be at least 1".into(),
        ));
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
            return Err(ReplayError::Refused(format!(
                "--dry-run compares mirrors; target {} is mapped (replay into a copy of it instead)",
                target.name
            )));
        }
        if args.rebuild && (sel.topic.is_some() || sel.partition.is_some()) {
            return Err(ReplayError::Refused(format!(
                "target {} is mapped and is rebuilt whole: drop --topic/--partition, or replay without --rebuild",
                target.name
            )));
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
) -> ReplayResult<Vec<(TopicPartition, i64)>> {
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
) -> ReplayResult<()> {
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
