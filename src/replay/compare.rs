//! Comparing a target with what the log says it should hold.
//!
//! Both `--dry-run` and `verify` replay into scratch tables in the target's database (made
//! `LIKE` the target's, so column types match) with the same apply code, then diff row by row
//! on the primary key. Every column is compared except `cdc_synced_at` (wall-clock time of the
//! apply).

use std::collections::BTreeSet;
use std::fmt;

use super::error::{Context, ReplayError, ReplayResult};
use tokio_postgres::{Client, GenericClient, IsolationLevel};

use super::source::Plan;
use super::{
    apply_plan, apply_selection, target_checkpoints, Progress, Reader, ReplayArgs, Selection,
    Summary,
};
use crate::config::{Config, StateConfig, Target};
use crate::domain::TableId;
use crate::naming::MirrorNaming;
use crate::sink::ident::quote_ident;
use crate::sink::state::{sources, StateSink};

/// How one table differs between the target ("actual") and the log ("expected").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableDiff {
    pub table: String,
    /// Keys the log has and the target lacks.
    pub missing: u64,
    /// Keys the target has and the log does not.
    pub unexpected: u64,
    /// Keys in both with different values.
    pub differs: u64,
    /// Up to 10 (kind, key) examples.
    pub samples: Vec<(String, String)>,
}

impl TableDiff {
    pub fn is_empty(&self) -> bool {
        self.missing + self.unexpected + self.differs == 0
    }
}

/// Wording for a verify (differences) or a dry run (what the replay would do).
pub struct Described<'a> {
    pub diff: &'a TableDiff,
    pub dry_run: bool,
}

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.diff;
        if self.dry_run {
            write!(
                f,
                "{}: would insert {}, update {}, delete {}",
                d.table, d.missing, d.differs, d.unexpected
            )?;
        } else {
            write!(
                f,
                "{}: {} missing, {} unexpected, {} different",
                d.table, d.missing, d.unexpected, d.differs
            )?;
        }
        for (kind, key) in &d.samples {
            let kind = match (self.dry_run, kind.as_str()) {
                (true, "missing") => "insert",
                (true, "unexpected") => "delete",
                (true, _) => "update",
                (false, k) => k,
            };
            write!(f, "\n    {kind} {key}")?;
        }
        Ok(())
    }
}

/// `s` quoted as a SQL identifier, or why it cannot be one.
pub(super) fn q(s: &str) -> ReplayResult<String> {
    quote_ident(s).map_err(ReplayError::Refused)
}

async fn table_exists(
    client: &impl GenericClient,
    schema: &str,
    table: &str,
) -> ReplayResult<bool> {
    let qualified = format!("{}.{}", q(schema)?, q(table)?);
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
        .await?
        .get(0))
}

/// Primary-key columns of a table, in key order.
async fn key_columns(client: &Client, schema: &str, table: &str) -> ReplayResult<Vec<String>> {
    let qualified = format!("{}.{}", q(schema)?, q(table)?);
    let rows = client
        .query(crate::sink::state::PRIMARY_KEY_COLUMNS, &[&qualified])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Diffs `actual.table` against `expected.table` on the primary key.
pub async fn diff_table(
    client: &Client,
    actual: &str,
    expected: &str,
    table: &str,
) -> ReplayResult<TableDiff> {
    let mut out = TableDiff {
        table: table.to_string(),
        ..TableDiff::default()
    };
    let keys = key_columns(client, expected, table).await?;
    if keys.is_empty() {
        return Err(ReplayError::Refused(format!(
            "{expected}.{table} has no primary key to compare on"
        )));
    }
    let key_expr: Vec<String> = keys
        .iter()
        .map(|k| Ok(format!("'{}', x.{}", k.replace('\'', "''"), q(k)?)))
        .collect::<ReplayResult<_>>()?;
    let rows_of = |schema: &str| -> ReplayResult<String> {
        Ok(format!(
            "SELECT jsonb_build_object({}) AS k, to_jsonb(x) - 'cdc_synced_at' AS j FROM {}.{} x",
            key_expr.join(", "),
            q(schema)?,
            q(table)?
        ))
    };
    let actual_rows = if table_exists(client, actual, table).await? {
        rows_of(actual)?
    } else {
        // No table in the target yet: everything the log has is missing.
        "SELECT NULL::jsonb AS k, NULL::jsonb AS j WHERE false".to_string()
    };
    let sql = format!(
        "WITH a AS ({actual_rows}), e AS ({}),
              d AS (SELECT CASE WHEN a.k IS NULL THEN 'missing'
                                WHEN e.k IS NULL THEN 'unexpected'
                                ELSE 'different' END AS kind,
                           coalesce(a.k, e.k)::text AS key
                      FROM a FULL JOIN e ON a.k = e.k
                     WHERE a.j IS DISTINCT FROM e.j)
         SELECT kind, count(*), (array_agg(key ORDER BY key))[1:10] FROM d GROUP BY kind",
        rows_of(expected)?
    );
    for r in client.query(&sql, &[]).await.context("comparing tables")? {
        let kind: String = r.get(0);
        let n = r.get::<_, i64>(1) as u64;
        match kind.as_str() {
            "missing" => out.missing = n,
            "unexpected" => out.unexpected = n,
            _ => out.differs = n,
        }
        for key in r.get::<_, Vec<String>>(2) {
            if out.samples.len() < 10 {
                out.samples.push((kind.clone(), key));
            }
        }
    }
    Ok(out)
}

/// A schema of scratch tables in the target database; dropped by [`Scratch::drop_all`].
struct Scratch {
    names: Vec<String>,
}

impl Scratch {
    async fn create(client: &Client, purposes: &[&str]) -> ReplayResult<Self> {
        let stamp = chrono::Utc::now().format("%H%M%S%3f");
        let mut names = Vec::new();
        for p in purposes {
            let name = format!("cdc_scratch_{p}_{}_{stamp}", std::process::id());
            client
                .batch_execute(&format!("CREATE SCHEMA {}", q(&name)?))
                .await
                .with_context(|| format!("creating scratch schema {name}"))?;
            names.push(name);
        }
        Ok(Self { names })
    }

    async fn drop_all(self, client: &Client) {
        for n in &self.names {
            if let Err(e) = sources::forget_sources(client, n).await {
                eprintln!(
                    "cdc-replay: could not forget the mirror sources of scratch schema {n}: {e}"
                );
            }
            if let Err(e) = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{n}\" CASCADE"))
                .await
            {
                eprintln!("cdc-replay: could not drop scratch schema {n}: {e}; drop it by hand");
            }
        }
    }
}

/// Copies the structure (and with `rows`, the content) of existing tables.
async fn copy_tables(
    client: &Client,
    from: &str,
    to: &str,
    tables: &[String],
    rows: bool,
) -> ReplayResult<()> {
    for t in tables {
        if !table_exists(client, from, t).await? {
            continue;
        }
        let (src, dst) = (
            format!("{}.{}", q(from)?, q(t)?),
            format!("{}.{}", q(to)?, q(t)?),
        );
        client
            .batch_execute(&format!(
                "CREATE TABLE {dst} (LIKE {src} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)"
            ))
            .await
            .with_context(|| format!("copying the structure of {src}"))?;
        if rows {
            client
                .batch_execute(&format!("INSERT INTO {dst} SELECT * FROM {src}"))
                .await
                .with_context(|| format!("copying {src}"))?;
        }
    }
    Ok(())
}

/// The target's mirrors of `tables` (crate::sink::state::sources::mirror_names).
async fn mirror_names(
    client: &Client,
    target: &Target,
    tables: &BTreeSet<TableId>,
) -> ReplayResult<Vec<String>> {
    let naming = MirrorNaming::from_config(target.state.table_name.as_deref())
        .map_err(ReplayError::Refused)?;
    Ok(sources::mirror_names(client, &target.state.schema, &naming, tables).await?)
}

fn scratch_sink(target: &Target, schema: &str, config: &Config) -> StateSink {
    StateSink::new(
        target.postgres.clone(),
        &StateConfig {
            enabled: true,
            schema: schema.to_string(),
            delete_mode: target.state.delete_mode,
            key_columns: target.state.key_columns.clone(),
            table_name: target.state.table_name.clone(),
            column_types: target.state.column_types.clone(),
            time_precision_mode: target.state.time_precision_mode,
        },
        config.kafka.checkpoint_name().to_string(),
    )
}

/// `--dry-run`: replays into a scratch copy of the target and reports the differences the
/// replay would make. Writes nothing to the target.
pub async fn dry_run(
    config: &Config,
    target: &Target,
    reader: &Reader,
    sel: &Selection,
    plan: &Plan,
    args: &ReplayArgs,
) -> ReplayResult<Summary> {
    let client = crate::db::connect(&target.postgres, "cdc-replay dry-run").await?;
    let scratch = Scratch::create(&client, &["dryrun"]).await?;
    let result = async {
        let names = mirror_names(&client, target, &plan.tables).await?;
        sources::copy_sources(&client, &target.state.schema, &scratch.names[0], &names).await?;
        copy_tables(
            &client,
            &target.state.schema,
            &scratch.names[0],
            &names,
            !args.rebuild,
        )
        .await?;
        let mut sink = scratch_sink(target, &scratch.names[0], config);
        let mut summary = apply_plan(
            config,
            reader,
            sel,
            plan,
            &mut sink,
            args.batch_size,
            "dry run",
        )
        .await?;
        for t in &names {
            summary
                .changes
                .push(diff_table(&client, &target.state.schema, &scratch.names[0], t).await?);
        }
        Ok::<_, ReplayError>(summary)
    }
    .await;
    scratch.drop_all(&client).await;
    result
}

/// `cdc-lake verify`: recomputes the target from the log up to the target's own checkpoints
/// and compares. The target's rows and checkpoints are read from one snapshot, so a target the
/// ingest pod keeps writing compares exactly too.
pub async fn verify(
    config: &Config,
    target: &Target,
    reader: &Reader,
) -> ReplayResult<Vec<TableDiff>> {
    if !target.mappings.is_empty() {
        return Err(ReplayError::Refused(format!(
            "verify compares mirrors with the log; target {} is mapped (docs/analytics.md: rebuild it with cdc-replay --rebuild, or compare its views with the source)",
            target.name
        )));
    }
    let mut client = crate::db::connect(&target.postgres, "cdc-lake verify").await?;
    let everything = Selection::default();
    let plan = reader.plan(&everything).await?;
    let names = mirror_names(&client, target, &plan.tables).await?;
    let scratch = Scratch::create(&client, &["actual", "expected"]).await?;
    let result = async {
        let (actual, expected) = (scratch.names[0].clone(), scratch.names[1].clone());
        // One snapshot: the target's rows and the checkpoint they correspond to.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .start()
            .await?;
        let checkpoints = target_checkpoints(&tx, target, config).await?;
        for t in &names {
            if table_exists(&tx, &target.state.schema, t).await? {
                let (src, dst) = (
                    format!("{}.{}", q(&target.state.schema)?, q(t)?),
                    format!("{}.{}", q(&actual)?, q(t)?),
                );
                tx.batch_execute(&format!("CREATE TABLE {dst} AS SELECT * FROM {src}"))
                    .await?;
            }
        }
        tx.commit().await?;
        copy_tables(&client, &target.state.schema, &expected, &names, false).await?;
        sources::copy_sources(&client, &target.state.schema, &expected, &names).await?;

        let mut sink = scratch_sink(target, &expected, config);
        let mut summary = Summary::default();
        let mut progress = Progress::new(plan.events, "verify");
        let selections: Vec<Selection> = if checkpoints.is_empty() {
            // A target only replays write: compare with the whole log.
            vec![everything.clone()]
        } else {
            checkpoints
                .iter()
                .filter(|(_, next)| *next > 0)
                .map(|(tp, next)| Selection {
                    topic: Some(tp.topic.clone()),
                    partition: Some(tp.partition),
                    to_offset: Some(next - 1),
                    ..Selection::default()
                })
                .collect()
        };
        for sel in &selections {
            if reader.plan(sel).await?.events > 0 {
                apply_selection(
                    config,
                    reader,
                    sel,
                    &mut sink,
                    10_000,
                    &mut progress,
                    &mut summary,
                )
                .await?;
            }
        }
        progress.finish();
        let mut diffs = Vec::new();
        for t in &names {
            if table_exists(&client, &expected, t).await? {
                diffs.push(diff_table(&client, &actual, &expected, t).await?);
            }
        }
        Ok::<_, ReplayError>(diffs)
    }
    .await;
    scratch.drop_all(&client).await;
    result
}

/// A type family for comparing a mirror column with its source column: the mirror may hold a
/// source `uuid` as text or a `numeric` as double (schemaless capture), which compare equal by
/// value; other types compare only when they are the same type.
fn type_family(data_type: &str) -> &str {
    match data_type {
        "text" | "character varying" | "character" | "uuid" => "text",
        "smallint" | "integer" | "bigint" | "numeric" | "double precision" | "real" => "number",
        other => other,
    }
}

/// Columns of a table with their `information_schema` data types, in order.
async fn columns_of(
    client: &Client,
    schema: &str,
    table: &str,
) -> ReplayResult<Vec<(String, String)>> {
    Ok(client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
              WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
            &[&schema, &table],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Rows of `schema.table` as (key JSON, values JSON) text, numbers normalised by value.
async fn rows_as_json(
    client: &Client,
    schema: &str,
    table: &str,
    keys: &[String],
    columns: &[(String, String)],
    filter: &str,
) -> ReplayResult<std::collections::BTreeMap<String, String>> {
    let value = |(c, family): &(String, String)| -> ReplayResult<String> {
        let col = format!("x.{}", q(c)?);
        let expr = if family == "number" {
            format!("trim_scale({col}::numeric)")
        } else {
            col
        };
        Ok(format!("'{}', {expr}", c.replace('\'', "''")))
    };
    let key_cols: Vec<(String, String)> = keys
        .iter()
        .map(|k| {
            let fam = columns
                .iter()
                .find(|(c, _)| c == k)
                .map_or("text".to_string(), |(_, f)| f.clone());
            (k.clone(), fam)
        })
        .collect();
    let k: Vec<String> = key_cols.iter().map(value).collect::<ReplayResult<_>>()?;
    let v: Vec<String> = columns.iter().map(value).collect::<ReplayResult<_>>()?;
    let sql = format!(
        "SELECT jsonb_build_object({})::text, jsonb_build_object({})::text FROM {}.{} x {filter}",
        k.join(", "),
        v.join(", "),
        q(schema)?,
        q(table)?
    );
    Ok(client
        .query(&sql, &[])
        .await
        .with_context(|| format!("reading {schema}.{table}"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// `verify --source-db`: compares each mirror with its table in the source database, row by row
/// on the key, over the columns both have with compatible types. Returns the differences and,
/// per table, the columns left out because their types differ.
pub async fn compare_with_source(
    target: &Target,
    source_url: &str,
    tables: &BTreeSet<TableId>,
) -> ReplayResult<Vec<(TableDiff, Vec<String>)>> {
    let source_pg = crate::config::PostgresConfig {
        url: source_url.to_string(),
        password_file: None,
        password: None,
    };
    let source = crate::db::connect(&source_pg, "cdc-lake verify (source)").await?;
    let mirror = crate::db::connect(&target.postgres, "cdc-lake verify").await?;
    let mut out = Vec::new();
    let source_db: String = source
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    let naming = MirrorNaming::from_config(target.state.table_name.as_deref())
        .map_err(ReplayError::Refused)?;
    for t in tables {
        // The mirror this source database's table went to; the naming's guess before any
        // change was applied.
        let name =
            match sources::recorded_mirror(&mirror, &target.state.schema, &source_db, t).await? {
                Some(name) => name,
                None => naming.mirror_name(
                    &crate::domain::SourceDb {
                        server: String::new(),
                        db: source_db.clone(),
                    },
                    t,
                ),
            };
        let src_cols = columns_of(&source, &t.schema, &t.table).await?;
        if src_cols.is_empty() {
            continue; // Not in this source database (another connector's table).
        }
        let mir_cols = columns_of(&mirror, &target.state.schema, &name).await?;
        let keys = key_columns(&mirror, &target.state.schema, &name).await?;
        let mut compared = Vec::new();
        let mut skipped = Vec::new();
        for (c, src_ty) in &src_cols {
            match mir_cols.iter().find(|(m, _)| m == c) {
                Some((_, m_ty)) if type_family(m_ty) == type_family(src_ty) => {
                    compared.push((c.clone(), type_family(src_ty).to_string()))
                }
                Some((_, m_ty)) => skipped.push(format!("{c} ({src_ty} vs {m_ty})")),
                None => skipped.push(format!("{c} (not in the mirror)")),
            }
        }
        let expected = rows_as_json(&source, &t.schema, &t.table, &keys, &compared, "").await?;
        let deleted_filter = if mir_cols.iter().any(|(c, _)| c == "cdc_deleted") {
            "WHERE NOT x.cdc_deleted"
        } else {
            ""
        };
        let actual = rows_as_json(
            &mirror,
            &target.state.schema,
            &name,
            &keys,
            &compared,
            deleted_filter,
        )
        .await?;
        let mut diff = TableDiff {
            table: name,
            ..TableDiff::default()
        };
        let sample = |kind: &str, key: &str, diff: &mut TableDiff| {
            if diff.samples.len() < 10 {
                diff.samples.push((kind.to_string(), key.to_string()));
            }
        };
        for (k, v) in &expected {
            match actual.get(k) {
                None => {
                    diff.missing += 1;
                    sample("missing", k, &mut diff);
                }
                Some(a) if a != v => {
                    diff.differs += 1;
                    sample("different", k, &mut diff);
                }
                Some(_) => {}
            }
        }
        for k in actual.keys().filter(|k| !expected.contains_key(*k)) {
            diff.unexpected += 1;
            sample("unexpected", k, &mut diff);
        }
        out.push((diff, skipped));
    }
    Ok(out)
}
