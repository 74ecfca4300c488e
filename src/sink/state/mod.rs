//! Current state: `cdc_processed.<table>` mirrors, applied set-based per batch.
//!
//! Per table and batch: binary COPY of the changes into a temporary staging table, then one
//! `MERGE` that keeps the last change per key and inserts, updates or deletes, guarded by the
//! source position so that replays and duplicates never move a row backwards. The checkpoint
//! advances in the same transaction.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use postgres_types::{Json, ToSql, Type};
use serde_json::{Map, Value};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::{Client, Transaction};

pub mod sources;

use super::coerce::ColumnCoercion;
use super::ident::quote_ident;
use super::mapping::{Mapping, DELETED_COLUMN, POSITION_COLUMN};
use super::{checkpoint, savepoint, Ack, Bisect, ErrorClass, Offsets, Sink, SinkError, WriteStats};
use crate::batch::Batch;
use crate::config::{
    DeleteMode, PostgresConfig, StateConfig, Target, TimePrecisionMode, PROCESSED_TARGET,
};
use crate::domain::{TableId, TopicPartition};
use crate::envelope::value::UNAVAILABLE_VALUE;
use crate::envelope::{ChangeEvent, ColumnType, Decoded, Op, RowSchema, TimeUnit};
use crate::naming::MirrorNaming;

pub const NAME: &str = "state";

/// Advisory lock key held while a target's setup SQL runs (arbitrary constant).
const SETUP_LOCK: i64 = 7_220_211_006;

/// Metadata columns every mirror carries, after the source columns.
const META_COLUMNS: &[(&str, &str)] = &[
    ("cdc_operation", "text NOT NULL"),
    ("cdc_commit_lsn", "bigint NOT NULL"),
    ("cdc_lsn", "bigint NOT NULL"),
    ("cdc_source_ts", "timestamptz"),
    ("cdc_kafka_partition", "integer NOT NULL"),
    ("cdc_kafka_offset", "bigint NOT NULL"),
    ("cdc_synced_at", "timestamptz NOT NULL DEFAULT now()"),
    ("cdc_deleted", "boolean NOT NULL DEFAULT false"),
];

const STAGE_DDL: &str = "CREATE TEMP TABLE IF NOT EXISTS cdc_stage (
    _cdc_op text NOT NULL,
    _cdc_key jsonb NOT NULL,
    _cdc_row jsonb NOT NULL,
    _cdc_commit_lsn bigint NOT NULL,
    _cdc_lsn bigint NOT NULL,
    _cdc_partition integer NOT NULL,
    _cdc_offset bigint NOT NULL,
    _cdc_source_ts timestamptz
) ON COMMIT DELETE ROWS";
const STAGE_TYPES: &[Type] = &[
    Type::TEXT,
    Type::JSONB,
    Type::JSONB,
    Type::INT8,
    Type::INT8,
    Type::INT4,
    Type::INT8,
    Type::TIMESTAMPTZ,
];

/// The primary-key columns of the table named by `$1` (a qualified name), in key order.
pub(crate) const PRIMARY_KEY_COLUMNS: &str = "SELECT a.attname::text
   FROM pg_index i
   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
  WHERE i.indrelid = to_regclass($1) AND i.indisprimary
  ORDER BY array_position(i.indkey::int2[], a.attnum)";

/// The SQL type (`format_type`) of column `$2` of the table named by `$1` (a qualified name).
const COLUMN_TYPE: &str = "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
  WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped";

/// The PostgreSQL type of a mirror column. A column seen only as null so far (schemaless
/// input) has none yet: it is added, with the type of its first value, when one arrives
/// (until then its absence reads the same as NULL), rather than fixed as `text` forever.
pub fn pg_type(ty: &ColumnType) -> Option<String> {
    Some(match ty {
        ColumnType::Boolean => "boolean".into(),
        ColumnType::Int16 => "smallint".into(),
        ColumnType::Int32 => "integer".into(),
        ColumnType::Int64 => "bigint".into(),
        ColumnType::Float32 => "real".into(),
        ColumnType::Float64 => "double precision".into(),
        ColumnType::Decimal {
            precision: Some(p),
            scale,
        } if *scale >= 0 && i16::from(*scale) <= i16::from(*p) && *p <= 200 => {
            format!("numeric({p},{scale})")
        }
        ColumnType::Decimal { .. }
        | ColumnType::VariableDecimal
        | ColumnType::WideInteger
        | ColumnType::HugeInteger => "numeric".into(),
        ColumnType::Text => "text".into(),
        ColumnType::Uuid => "uuid".into(),
        ColumnType::Json => "jsonb".into(),
        ColumnType::Bytes => "bytea".into(),
        ColumnType::Date => "date".into(),
        ColumnType::Time(_) => "time".into(),
        ColumnType::Timestamp(TimeUnit::Millis | TimeUnit::Micros | TimeUnit::Nanos) => {
            "timestamp".into()
        }
        ColumnType::TimestampTz => "timestamptz".into(),
        ColumnType::TimeTz => "timetz".into(),
        ColumnType::Interval => "interval".into(),
        ColumnType::Array(elem) => format!("{}[]", pg_type(elem)?),
        ColumnType::Unknown => return None,
    })
}

/// Where one source table's changes in a batch land: the mirror or mapped table's name in the
/// target schema, and the source table (for messages and the mapped-table lookup).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Dest {
    name: String,
    table: TableId,
}

/// What the sink knows about one mirror or mapped table.
#[derive(Clone)]
struct Mirror {
    /// `"schema"."table"`, quoted.
    qualified: String,
    /// Source columns present in the table (mapped columns for a mapped table), in order.
    columns: Vec<String>,
    key: Vec<String>,
    delete_mode: DeleteMode,
    /// The mapping's row filter; `None` for mirrors.
    mapped: Option<MappedTable>,
    merge_sql: Option<String>,
    /// Columns known to be `numeric` already, so integers beyond 64 bits fit them.
    numeric: std::collections::BTreeSet<String>,
    /// How schemaless values convert to the mirror's column types, by column (read from the
    /// catalog after the table is made to fit; None until then).
    coercions: Option<HashMap<String, ColumnCoercion>>,
}

/// How a mapped table differs from a mirror: it keeps its own columns plus `__cdc_position`
/// (and `__cdc_deleted` for soft deletes), and may filter rows.
#[derive(Clone)]
struct MappedTable {
    filter: Option<String>,
}

pub struct StateSink {
    /// `state`, or `state:<target>` for a named target: the checkpoint rows' sink name.
    name: &'static str,
    pg: PostgresConfig,
    consumer: String,
    schema: String,
    delete_mode: DeleteMode,
    /// Configured key columns of keyless source tables, by `schema.table`.
    key_columns: BTreeMap<String, Vec<String>>,
    /// Declared SQL types of schemaless sources' mirror columns (`column_types`).
    column_types: BTreeMap<String, BTreeMap<String, String>>,
    time_precision_mode: TimePrecisionMode,
    client: Option<Client>,
    /// How source tables name their mirrors (`table_name`).
    naming: MirrorNaming,
    /// Known mirrors and mapped tables, by name in the target schema.
    mirrors: HashMap<String, Mirror>,
    /// The source each mirror belongs to, as recorded in `cdc_lake.mirror_sources`.
    owners: HashMap<String, sources::Owner>,
    /// Declarative mappings: when present, the target holds only the tables they map.
    mappings: Vec<Mapping>,
    /// The target's setup SQL, run when it is first opened.
    setup_sql: Vec<std::path::PathBuf>,
    /// Mapped tables, checked against the catalog when the target was opened.
    mapped_tables: HashMap<TableId, Mirror>,
    prepared: bool,
}

fn pg_err(
    sink: &'static str,
    context: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
    let context = context.into();
    move |source| SinkError::Postgres {
        sink,
        context,
        source,
    }
}

impl StateSink {
    pub fn new(pg: PostgresConfig, cfg: &StateConfig, consumer: impl Into<String>) -> Self {
        Self {
            name: NAME,
            pg,
            consumer: consumer.into(),
            schema: cfg.schema.clone(),
            delete_mode: cfg.delete_mode,
            key_columns: cfg.key_columns.clone(),
            column_types: cfg.column_types.clone(),
            time_precision_mode: cfg.time_precision_mode,
            client: None,
            naming: MirrorNaming::from_config(cfg.table_name.as_deref())
                .expect("validated with the config"),
            mirrors: HashMap::new(),
            owners: HashMap::new(),
            mappings: Vec::new(),
            setup_sql: Vec::new(),
            mapped_tables: HashMap::new(),
            prepared: false,
        }
    }

    /// The sink of a configured target (`[state]` or `[targets.<name>]`).
    pub fn for_target(target: &Target, consumer: impl Into<String>) -> Self {
        let mut sink = Self::new(target.postgres.clone(), &target.state, consumer);
        if target.name != PROCESSED_TARGET {
            // One name per configured target for the life of the process: leaking it gives
            // the `&'static str` that errors and metrics carry.
            sink.name = Box::leak(target.sink_name().into_boxed_str());
        }
        sink.setup_sql = target.setup_sql.clone();
        sink.mappings = target
            .mappings
            .iter()
            .enumerate()
            .map(|(i, m)| Mapping::compile(&target.name, i, m).expect("validated with the config"))
            .collect();
        sink
    }

    /// Opens the target: runs its setup SQL and checks its mappings against the catalog. An
    /// error here is a configuration problem; the message names the mapping and column.
    pub async fn prepare(&mut self) -> Result<(), SinkError> {
        self.connect().await
    }

    async fn prepare_mappings(&mut self, client: &Client) -> Result<(), SinkError> {
        let target = self.name;
        let fail = |reason: String| SinkError::Mapping { target, reason };
        for path in &self.setup_sql {
            let sql = std::fs::read_to_string(path)
                .map_err(|e| fail(format!("cannot read setup_sql {}: {e}", path.display())))?;
            // Serialised across pods: concurrent CREATE OR REPLACE VIEW of one view fails.
            let locked = format!(
                "SELECT pg_advisory_lock({SETUP_LOCK}); {sql}; SELECT pg_advisory_unlock({SETUP_LOCK})"
            );
            if let Err(e) = client.batch_execute(&locked).await {
                let _ = client
                    .batch_execute(&format!("SELECT pg_advisory_unlock({SETUP_LOCK})"))
                    .await;
                return Err(fail(format!(
                    "setup_sql {} failed: {}",
                    path.display(),
                    super::pg_detail(&e)
                )));
            }
        }
        self.mapped_tables.clear();
        for m in &mut self.mappings {
            m.prepare(client, &self.schema).await.map_err(fail)?;
            let table = TableId {
                schema: self.schema.clone(),
                table: m.table.clone(),
            };
            let mirror = Mirror {
                qualified: format!(
                    "{}.{}",
                    quote_ident(&self.schema).expect("validated in config"),
                    quote_ident(&m.table).expect("validated in config")
                ),
                columns: m.target_columns(),
                key: m.key.clone(),
                delete_mode: m.delete,
                mapped: Some(MappedTable {
                    filter: m.filter.clone(),
                }),
                merge_sql: None,
                numeric: Default::default(),
                coercions: None,
            };
            if let Some(other) = self.mapped_tables.get(&table) {
                if other.columns != mirror.columns || other.key != mirror.key {
                    return Err(fail(format!(
                        "{} writes {table}, which another mapping writes with other columns or key; one table, one shape",
                        m.label
                    )));
                }
            }
            self.mapped_tables.insert(table, mirror);
        }
        if !self.mappings.is_empty() {
            tracing::info!(
                target = self.name,
                tables = self.mapped_tables.len(),
                "mappings checked against the target database"
            );
        }
        Ok(())
    }

    /// The tables this target's mappings write (after [`StateSink::prepare`]); empty for a
    /// mirror target.
    pub fn mapped_table_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.mapped_tables.keys().map(|t| t.table.clone()).collect();
        names.sort();
        names
    }

    /// The schema holding this target's mirrors.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The connection, opened (with the staging table) if needed.
    pub async fn client(&mut self) -> Result<&mut Client, SinkError> {
        self.connect().await?;
        Ok(self.client.as_mut().expect("connected"))
    }

    /// Forgets cached table definitions (after a replay dropped or emptied tables).
    pub fn forget_tables(&mut self) {
        self.mirrors.clear();
        self.owners.clear();
    }

    /// How this target names its mirrors.
    pub fn naming(&self) -> &MirrorNaming {
        &self.naming
    }

    /// `"schema"."mirror"` of a destination, or why the mirror name cannot be an identifier.
    fn qualified(&self, dest: &Dest) -> Result<String, SinkError> {
        let bad = |reason| SinkError::Encode {
            table: dest.table.to_string(),
            reason,
        };
        Ok(format!(
            "{}.{}",
            quote_ident(&self.schema).map_err(bad)?,
            quote_ident(&dest.name).map_err(bad)?
        ))
    }

    /// Where a change lands: its mapped table, or the mirror its source table is named to.
    fn dest_of(&self, e: &ChangeEvent) -> Dest {
        let name = if self.mapped_tables.contains_key(&e.table) {
            e.table.table.clone()
        } else {
            self.naming.mirror_name(&e.source_db(), &e.table)
        };
        Dest {
            name,
            table: e.table.clone(),
        }
    }

    async fn connect(&mut self) -> Result<(), SinkError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let client = super::connect(&self.pg, self.name).await?;
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {}; {STAGE_DDL}",
                    quote_ident(&self.schema).expect("validated in config")
                ))
                .await
                .map_err(pg_err(self.name, "creating the staging table"))?;
            if !self.prepared {
                self.prepare_mappings(&client).await?;
                self.prepared = true;
            }
            self.client = Some(client);
            // Another pod may have changed the tables meanwhile: re-read them.
            self.forget_tables();
        }
        Ok(())
    }

    /// Applies a batch from a replay: every change, whatever the checkpoint, which stays as it
    /// is (the ordering guard keeps rows from moving backwards). Same apply code as live.
    pub async fn apply_replay(&mut self, batch: &Batch) -> Result<WriteStats, SinkError> {
        if batch.is_empty() {
            return Ok(WriteStats::default());
        }
        let result = self.write_inner(batch, false).await;
        if result.as_ref().is_err_and(SinkError::needs_reconnect) {
            self.client = None;
        }
        result.map(|ack| ack.stats)
    }

    /// One transaction: the batch's changes, and with `checkpointed` the checkpoint rows
    /// (locked first; records below them skipped; advanced at the end).
    async fn write_inner(&mut self, batch: &Batch, checkpointed: bool) -> Result<Ack, SinkError> {
        self.connect().await?;
        let ranges = batch.ranges();
        let tps: Vec<TopicPartition> = ranges.keys().cloned().collect();
        let mut client = self.client.take().expect("connected");
        let result = async {
            let tx = client
                .transaction()
                .await
                .map_err(pg_err(self.name, "beginning"))?;
            let (stored, next) = if checkpointed {
                let stored = checkpoint::lock(&tx, self.name, &self.consumer, &tps).await?;
                // Checked before applying anything: a batch that does not continue from the
                // checkpoint would leave a gap.
                let next = checkpoint::after_batch(self.name, &ranges, &stored)?;
                (stored, next)
            } else {
                let next = ranges
                    .iter()
                    .map(|(tp, (_, last))| (tp.clone(), last + 1))
                    .collect();
                (Offsets::new(), next)
            };
            let mut stats = WriteStats::default();

            let mut changes: Vec<&ChangeEvent> = Vec::new();
            for r in &batch.records {
                let c = r.coords();
                if c.offset < stored.get(&c.topic_partition()).copied().unwrap_or(0) {
                    stats.already_stored += 1;
                    continue;
                }
                match r {
                    Decoded::Change(e) => changes.push(e),
                    Decoded::Reject(_) => *stats.ignored.entry("rejected").or_default() += 1,
                    Decoded::Skip(_, reason) => {
                        *stats.ignored.entry(reason.as_str()).or_default() += 1
                    }
                }
            }
            let mapped;
            if !self.mappings.is_empty() {
                mapped = self.map_changes(&tx, &changes, &mut stats).await?;
                changes = mapped.iter().collect();
            }
            // Changes per destination table, in Kafka order.
            // Names depend on (server, database, table) only: computed once per batch for each.
            let mut dests: HashMap<(&str, &str, &TableId), Dest> = HashMap::new();
            let mut by_dest: BTreeMap<Dest, Vec<&ChangeEvent>> = BTreeMap::new();
            for e in changes {
                let source = (
                    e.source.name.as_deref().unwrap_or(""),
                    e.source.db.as_deref().unwrap_or(""),
                    &e.table,
                );
                let dest = dests.entry(source).or_insert_with(|| self.dest_of(e));
                match by_dest.get_mut(dest) {
                    Some(events) => events.push(e),
                    None => {
                        by_dest.insert(dest.clone(), vec![e]);
                    }
                }
            }
            for (dest, events) in by_dest {
                let events = self.own_source_only(&tx, &dest, events, &mut stats).await?;
                self.apply_table(&tx, &dest, &events, &mut stats).await?;
            }

            if checkpointed {
                checkpoint::advance(&tx, self.name, &self.consumer, &next).await?;
            }
            tx.commit().await.map_err(pg_err(self.name, "committing"))?;
            Ok(Ack {
                durable: next.into_iter().collect(),
                stats,
            })
        }
        .await;
        self.client = Some(client);
        if result.is_err() {
            // DDL and claims may have rolled back with the transaction: forget what we think
            // exists.
            self.forget_tables();
        }
        result
    }

    /// Each change as the rows of the mappings of its topic (none matching: skipped and
    /// counted). A change a mapping cannot convert is rejected with the reason.
    async fn map_changes(
        &self,
        tx: &Transaction<'_>,
        changes: &[&ChangeEvent],
        stats: &mut WriteStats,
    ) -> Result<Vec<ChangeEvent>, SinkError> {
        let mut out = Vec::new();
        let synced_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        for e in changes {
            let mut matched = false;
            for m in self.mappings.iter().filter(|m| m.matches(&e.coords.topic)) {
                matched = true;
                match m.apply(e, &self.schema, &synced_at) {
                    Ok(Some(mapped)) => out.push(mapped),
                    Ok(None) => *stats.ignored.entry("logical_message").or_default() += 1,
                    Err(reason) => {
                        reject(tx, self.name, e, &reason).await?;
                        *stats.ignored.entry("rejected_by_mapping").or_default() += 1;
                    }
                }
            }
            if !matched {
                *stats.ignored.entry("unmapped").or_default() += 1;
            }
        }
        Ok(out)
    }

    /// The delete policy of a table: its mapping's, or the target's for mirrors.
    fn delete_mode_of(&self, table: &TableId) -> DeleteMode {
        self.mapped_tables
            .get(table)
            .map_or(self.delete_mode, |m| m.delete_mode)
    }

    /// Applies one table's changes, split at truncates (which must apply in order).
    async fn apply_table(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        events: &[&ChangeEvent],
        stats: &mut WriteStats,
    ) -> Result<(), SinkError> {
        let table = &dest.table;
        // Keyless tables: a key from the configured columns, or a reject that says how to
        // configure one. Raw log and lake keep these changes either way.
        let mut keyed: Vec<Cow<ChangeEvent>> = Vec::with_capacity(events.len());
        for e in events {
            if e.key.as_ref().is_some_and(Value::is_object)
                || matches!(e.op, Op::Message | Op::Truncate)
            {
                keyed.push(Cow::Borrowed(*e));
                continue;
            }
            match self.configured_key(table, e) {
                Ok(key) => {
                    let mut owned = (*e).clone();
                    owned.key = Some(Value::Object(key));
                    keyed.push(Cow::Owned(owned));
                }
                Err(reason) => {
                    reject(tx, self.name, e, &reason).await?;
                    *stats.ignored.entry("no_primary_key").or_default() += 1;
                }
            }
        }
        let mut pending: Vec<&ChangeEvent> = Vec::new();
        for e in keyed.iter().map(|c| c.as_ref()) {
            match e.op {
                Op::Message => *stats.ignored.entry("logical_message").or_default() += 1,
                // An append-only mapping keeps its rows through a source truncate too.
                Op::Truncate
                    if self.mapped_tables.contains_key(table)
                        && self.delete_mode_of(table) == DeleteMode::Ignore =>
                {
                    *stats.ignored.entry("truncate_ignored").or_default() += 1
                }
                Op::Truncate => {
                    self.apply_changes(tx, dest, &pending, stats).await?;
                    pending.clear();
                    savepoint(tx, self.name, "SAVEPOINT cdc_truncate").await?;
                    match self.truncate(tx, dest, e).await {
                        Ok(()) => {
                            savepoint(tx, self.name, "RELEASE SAVEPOINT cdc_truncate").await?;
                            stats.written += 1;
                        }
                        Err(err) if err.class() == ErrorClass::BadData => {
                            savepoint(
                                tx,
                                self.name,
                                "ROLLBACK TO SAVEPOINT cdc_truncate; RELEASE SAVEPOINT cdc_truncate",
                            )
                            .await?;
                            let reason = self.reject_reason(tx, dest, e, &err).await;
                            self.reject_one(tx, e, &reason, stats).await?;
                        }
                        Err(err) => return Err(err),
                    }
                }
                Op::Delete if self.delete_mode_of(table) == DeleteMode::Ignore => {
                    *stats.ignored.entry("delete_ignored").or_default() += 1
                }
                _ => pending.push(e),
            }
        }
        self.apply_changes(tx, dest, &pending, stats).await
    }

    /// Set-based apply. A change whose names no table can hold is rejected on its own first.
    /// If the set then fails on the data of some change (a value that does not fit its column,
    /// a key too large to index, a table PostgreSQL cannot create), the set is narrowed down by
    /// bisection, each attempt in a savepoint, so that only the changes that cause it are
    /// rejected (with the reason) and the rest apply.
    async fn apply_changes(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        events: &[&ChangeEvent],
        stats: &mut WriteStats,
    ) -> Result<(), SinkError> {
        let table = &dest.table;
        if events.is_empty() {
            return Ok(());
        }
        let mut usable: Vec<&ChangeEvent> = Vec::with_capacity(events.len());
        for e in events {
            match self.unusable_names(dest, e) {
                None => usable.push(*e),
                Some(reason) => self.reject_one(tx, e, &reason, stats).await?,
            }
        }
        let mut bisect = Bisect::new(usable.len());
        let mut narrowed = false;
        while let Some(range) = bisect.next_range() {
            // DDL inside a rolled-back savepoint is undone: so is what the cache learnt.
            let cached = self.mirrors.get(&dest.name).cloned();
            savepoint(tx, self.name, "SAVEPOINT cdc_apply").await?;
            match self.apply_set(tx, dest, &usable[range.clone()]).await {
                Ok(key_mismatches) => {
                    savepoint(tx, self.name, "RELEASE SAVEPOINT cdc_apply").await?;
                    stats.written += (range.len() - key_mismatches.len()) as u64;
                    for (i, reason) in key_mismatches {
                        self.reject_one(tx, usable[range.start + i], &reason, stats)
                            .await?;
                    }
                }
                Err(e) if e.class() == ErrorClass::BadData => {
                    savepoint(
                        tx,
                        self.name,
                        "ROLLBACK TO SAVEPOINT cdc_apply; RELEASE SAVEPOINT cdc_apply",
                    )
                    .await?;
                    match cached {
                        Some(m) => self.mirrors.insert(dest.name.clone(), m),
                        None => self.mirrors.remove(&dest.name),
                    };
                    if !narrowed {
                        narrowed = true;
                        // A conversion reason may quote the value: it goes to cdc_rejects only.
                        let error = match &e {
                            SinkError::Value { .. } => {
                                "a value does not convert for its column (the reason is in cdc_rejects)".to_string()
                            }
                            other => other.to_string(),
                        };
                        tracing::warn!(table = %table, error = %error, "set-based apply failed on data; narrowing it down to the changes that cause it");
                    }
                    if let Some(i) = bisect.failed(range) {
                        let reason = self.reject_reason(tx, dest, usable[i], &e).await;
                        self.reject_one(tx, usable[i], &reason, stats).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One attempt: the table made to fit the changes, then staged and merged. Returns the
    /// changes (by index) whose key does not match the table's primary key, not applied.
    async fn apply_set(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        events: &[&ChangeEvent],
    ) -> Result<Vec<(usize, String)>, SinkError> {
        self.ensure_mirror(tx, dest, events).await?;
        let mirror = self.mirrors.get(&dest.name).expect("ensured above");
        let mut mismatched = Vec::new();
        let mut keyed = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            match key_mismatch(mirror, e) {
                Some(reason) => mismatched.push((i, reason)),
                None => keyed.push(*e),
            }
        }
        self.stage_and_merge(tx, dest, &keyed).await?;
        Ok(mismatched)
    }

    /// Why no mirror can take this change's column names (too long, NUL, a metadata column's
    /// name), or None. Mapped tables have their columns from the mapping.
    fn unusable_names(&self, dest: &Dest, e: &ChangeEvent) -> Option<String> {
        let table = &dest.table;
        if self.mapped_tables.contains_key(table) {
            return None;
        }
        let name = &dest.name;
        if let Err(reason) = quote_ident(name) {
            return Some(format!(
                "{table} cannot be mirrored: the mirror name {reason}"
            ));
        }
        let key = e.key.as_ref().and_then(Value::as_object);
        let columns = key
            .into_iter()
            .chain(e.before.as_ref())
            .chain(e.after.as_ref())
            .flat_map(|m| m.keys());
        for c in columns {
            if let Err(reason) = quote_ident(c) {
                return Some(format!(
                    "cannot apply to {}.{name} (source {table}): source column {reason}",
                    self.schema
                ));
            }
            if is_metadata_column(c) {
                return Some(format!(
                    "cannot apply to {}.{name} (source {table}): source column {c} has the name of a cdc-lake metadata column; the raw log and the lake keep the change",
                    self.schema
                ));
            }
        }
        None
    }

    /// The reason a single change failed, naming the table and, for a value, the column.
    async fn reject_reason(
        &self,
        tx: &Transaction<'_>,
        dest: &Dest,
        e: &ChangeEvent,
        err: &SinkError,
    ) -> String {
        let table = &dest.table;
        let detail = match err {
            SinkError::Postgres { source, .. } => super::pg_detail(source),
            other => other.to_string(),
        };
        let column = match err {
            SinkError::Postgres { source, .. }
                if source.code().is_some_and(|c| c.code().starts_with("22")) =>
            {
                match self.bad_column(tx, dest, e).await {
                    Some(c) => match self.column_type(tx, dest, &c).await {
                        Some(ty) => format!(" column {c} ({ty})"),
                        None => format!(" column {c}"),
                    },
                    None => String::new(),
                }
            }
            _ => String::new(),
        };
        format!(
            "cannot apply to {}.{}{column} (source {table}): {detail}",
            self.schema,
            dest.name.clone()
        )
    }

    /// Rejects one change at this sink's stage and counts it.
    async fn reject_one(
        &self,
        tx: &Transaction<'_>,
        e: &ChangeEvent,
        reason: &str,
        stats: &mut WriteStats,
    ) -> Result<(), SinkError> {
        reject(tx, self.name, e, reason).await?;
        *stats.ignored.entry("rejected_by_state").or_default() += 1;
        Ok(())
    }

    /// The key of a change of a keyless table, from `key_columns`; the error is the reject
    /// reason.
    fn configured_key(
        &self,
        table: &TableId,
        e: &ChangeEvent,
    ) -> Result<Map<String, Value>, String> {
        let name = table.to_string();
        let Some(columns) = self.key_columns.get(&name) else {
            return Err(format!(
                "{name} has no primary key: set {}key_columns.\"{name}\" = [\"col\", ...] to mirror it (raw log and lake keep it)",
                if self.name == NAME { "state.".to_string() } else { format!("targets.{}.", self.name.trim_start_matches("state:")) }
            ));
        };
        let row = e.row().ok_or_else(|| {
            format!("{name}: change without a row image to take key columns from")
        })?;
        columns
            .iter()
            .map(|c| match row.get(c) {
                Some(v) if !v.is_null() => Ok((c.clone(), v.clone())),
                _ => Err(format!(
                    "{name}: key column {c} (state key_columns) is missing or null in this change; deletes of keyless tables need REPLICA IDENTITY FULL"
                )),
            })
            .collect()
    }

    /// The first column of a change whose value its mirror column cannot hold, found by
    /// converting one value at a time (only on the error path), so the reject names it.
    async fn bad_column(
        &self,
        tx: &Transaction<'_>,
        dest: &Dest,
        e: &ChangeEvent,
    ) -> Option<String> {
        let mirror = self.mirrors.get(&dest.name)?;
        let row = e.after.as_ref().and_then(|a| e.sql_image(a, false).ok())?;
        let probe = format!(
            "SELECT jsonb_populate_record(NULL::{}, $1)",
            mirror.qualified
        );
        for (col, v) in row.iter() {
            if !mirror.columns.contains(col) {
                continue;
            }
            tx.batch_execute("SAVEPOINT cdc_probe").await.ok()?;
            let one = serde_json::json!({ col: v });
            let fits = tx.execute(&probe, &[&Json(&one)]).await.is_ok();
            tx.batch_execute("ROLLBACK TO SAVEPOINT cdc_probe")
                .await
                .ok()?;
            if !fits {
                return Some(col.clone());
            }
        }
        None
    }

    /// The SQL type of a mirror column, for reject reasons (PostgreSQL's own message would
    /// quote the value).
    async fn column_type(&self, tx: &Transaction<'_>, dest: &Dest, column: &str) -> Option<String> {
        let mirror = self.mirrors.get(&dest.name)?;
        tx.query_opt(COLUMN_TYPE, &[&mirror.qualified, &column])
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0))
    }

    /// Creates the mirror or adds columns that appeared in these changes.
    async fn ensure_mirror(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        events: &[&ChangeEvent],
    ) -> Result<(), SinkError> {
        let table = &dest.table;
        if let Some(mapped) = self.mapped_tables.get(table) {
            // Checked against the catalog when the target was opened; no DDL here.
            if !self.mirrors.contains_key(&dest.name) {
                self.mirrors.insert(dest.name.clone(), mapped.clone());
            }
            return Ok(());
        }
        let mut schema = RowSchema::default();
        let mut last: Option<&Arc<RowSchema>> = None;
        for e in events {
            if last.is_none_or(|l| !Arc::ptr_eq(l, &e.schema)) {
                schema.merge(&e.schema);
                last = Some(&e.schema);
            }
        }
        let qualified = self.qualified(dest)?;
        if !self.mirrors.contains_key(&dest.name) {
            let rows = tx
                .query(
                    "SELECT a.attname::text
                       FROM pg_attribute a
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                      ORDER BY a.attnum",
                    &[&qualified],
                )
                .await
                .map_err(pg_err(self.name, format!("reading columns of {qualified}")))?;
            let existing: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            // An existing table's key is its primary key; a new one takes the changes' key.
            let primary_key: Vec<String> = tx
                .query(PRIMARY_KEY_COLUMNS, &[&qualified])
                .await
                .map_err(pg_err(
                    self.name,
                    format!("reading the primary key of {qualified}"),
                ))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let key: Vec<String> = if primary_key.is_empty() {
                events
                    .iter()
                    .find_map(|e| e.key.as_ref().and_then(Value::as_object))
                    .map(|k| k.keys().cloned().collect())
                    .unwrap_or_default()
            } else {
                primary_key
            };
            let columns = if existing.is_empty() {
                // Source columns in source order (those whose type is known yet), key columns
                // NOT NULL, then cdc-lake's metadata columns. Later columns are appended.
                let bad_ident = |reason| SinkError::Encode {
                    table: table.to_string(),
                    reason,
                };
                let mut cols = Vec::new();
                let mut created = Vec::new();
                for k in key.iter().filter(|k| schema.column(k).is_none()) {
                    cols.push(format!(
                        "{} {} NOT NULL",
                        quote_ident(k).map_err(bad_ident)?,
                        declared_type(&self.column_types, table, k).unwrap_or("text")
                    ));
                    created.push(k.clone());
                }
                for c in &schema.columns {
                    let Some(ty) = declared_type(&self.column_types, table, &c.name)
                        .map(str::to_string)
                        .or_else(|| pg_type(&c.ty))
                        .or_else(|| key.contains(&c.name).then(|| "text".into()))
                    else {
                        continue;
                    };
                    check_not_metadata(table, &c.name)?;
                    let not_null = if key.contains(&c.name) {
                        " NOT NULL"
                    } else {
                        ""
                    };
                    cols.push(format!(
                        "{} {ty}{not_null}",
                        quote_ident(&c.name).map_err(bad_ident)?
                    ));
                    created.push(c.name.clone());
                }
                for (m, ty) in META_COLUMNS {
                    cols.push(format!("{m} {ty}"));
                }
                let pk: Vec<String> = key
                    .iter()
                    .map(|k| quote_ident(k).expect("checked above"))
                    .collect();
                tx.batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {qualified} ({}, PRIMARY KEY ({}))",
                    cols.join(", "),
                    pk.join(", ")
                ))
                .await
                .map_err(pg_err(self.name, format!("creating {qualified}")))?;
                tracing::info!(table = %qualified, key = ?key, "created mirror table");
                created
            } else {
                // A table the user created may lack cdc-lake's metadata columns.
                let missing: Vec<String> = META_COLUMNS
                    .iter()
                    .filter(|(m, _)| !existing.iter().any(|c| c == m))
                    .map(|(m, ty)| {
                        // Rows already there get a position of 0, so any change passes the
                        // ordering guard.
                        let default = match *ty {
                            t if t.contains("DEFAULT") || !t.contains("NOT NULL") => "",
                            t if t.starts_with("text") => " DEFAULT 'r'",
                            _ => " DEFAULT 0",
                        };
                        format!("ADD COLUMN IF NOT EXISTS {m} {ty}{default}")
                    })
                    .collect();
                if !missing.is_empty() {
                    tx.batch_execute(&format!("ALTER TABLE {qualified} {}", missing.join(", ")))
                        .await
                        .map_err(pg_err(
                            self.name,
                            format!("adding cdc-lake's metadata columns to {qualified}"),
                        ))?;
                    tracing::info!(table = %qualified, columns = missing.len(), "added metadata columns to an existing table");
                }
                existing
                    .into_iter()
                    .filter(|c| !c.starts_with("cdc_"))
                    .collect()
            };
            self.mirrors.insert(
                dest.name.clone(),
                Mirror {
                    qualified: qualified.clone(),
                    columns,
                    key,
                    delete_mode: self.delete_mode,
                    mapped: None,
                    merge_sql: None,
                    numeric: Default::default(),
                    coercions: None,
                },
            );
        }
        self.widen_integer_columns(tx, dest, &schema).await?;
        let mirror = self.mirrors.get_mut(&dest.name).expect("inserted above");
        let mut added = Vec::new();
        for col in &schema.columns {
            if mirror.columns.contains(&col.name) {
                continue;
            }
            let Some(ty) = declared_type(&self.column_types, table, &col.name)
                .map(str::to_string)
                .or_else(|| pg_type(&col.ty))
            else {
                continue;
            };
            check_not_metadata(table, &col.name)?;
            let q = quote_ident(&col.name).map_err(|reason| SinkError::Encode {
                table: table.to_string(),
                reason,
            })?;
            added.push(format!("ADD COLUMN IF NOT EXISTS {q} {ty}"));
            mirror.columns.push(col.name.clone());
        }
        if !added.is_empty() {
            tx.batch_execute(&format!(
                "ALTER TABLE {} {}",
                mirror.qualified,
                added.join(", ")
            ))
            .await
            .map_err(pg_err(
                self.name,
                format!("adding columns to {}", mirror.qualified),
            ))?;
            mirror.merge_sql = None;
            mirror.coercions = None;
            tracing::info!(table = %mirror.qualified, columns = added.len(), "added mirror columns");
        }
        if mirror.coercions.is_none() && mirror.mapped.is_none() {
            let rows = tx
                .query(
                    "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod)
                       FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                    &[&mirror.qualified],
                )
                .await
                .map_err(pg_err(
                    self.name,
                    format!("reading the column types of {}", mirror.qualified),
                ))?;
            let mode = self.time_precision_mode;
            mirror.coercions = Some(
                rows.iter()
                    .filter(|r| !is_metadata_column(r.get::<_, &str>(0)))
                    .filter_map(|r| {
                        let c = ColumnCoercion::of(r.get(1), r.get(2), mode)?;
                        Some((r.get::<_, String>(0), c))
                    })
                    .collect(),
            );
        }
        Ok(())
    }

    /// Integers beyond 64 bits (schemaless input) in a column that holds integers: the column
    /// becomes `numeric`, so every digit is kept. If PostgreSQL refuses (a view depends on the
    /// column, say), the column stays and values that do not fit are rejected with the reason.
    async fn widen_integer_columns(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        schema: &RowSchema,
    ) -> Result<(), SinkError> {
        let mirror = self
            .mirrors
            .get_mut(&dest.name)
            .expect("ensured by the caller");
        let wide: Vec<String> = schema
            .columns
            .iter()
            .filter(|c| matches!(c.ty, ColumnType::WideInteger | ColumnType::HugeInteger))
            .filter(|c| mirror.columns.contains(&c.name) && !mirror.numeric.contains(&c.name))
            .map(|c| c.name.clone())
            .collect();
        for column in wide {
            let ty: Option<String> = tx
                .query_opt(COLUMN_TYPE, &[&mirror.qualified, &column])
                .await
                .map_err(pg_err(
                    self.name,
                    format!("reading the type of {}.{column}", mirror.qualified),
                ))?
                .map(|r| r.get(0));
            if matches!(ty.as_deref(), Some("smallint" | "integer" | "bigint")) {
                let q = quote_ident(&column).map_err(|reason| SinkError::Encode {
                    table: dest.table.to_string(),
                    reason,
                })?;
                savepoint(tx, self.name, "SAVEPOINT cdc_widen").await?;
                let altered = tx
                    .batch_execute(&format!(
                        "ALTER TABLE {} ALTER COLUMN {q} TYPE numeric",
                        mirror.qualified
                    ))
                    .await;
                match altered {
                    Ok(()) => {
                        savepoint(tx, self.name, "RELEASE SAVEPOINT cdc_widen").await?;
                        mirror.merge_sql = None;
                        mirror.coercions = None;
                        tracing::info!(table = %mirror.qualified, column = %column, "widened a mirror column to numeric for integers beyond 64 bits");
                    }
                    Err(e) => {
                        savepoint(
                            tx,
                            self.name,
                            "ROLLBACK TO SAVEPOINT cdc_widen; RELEASE SAVEPOINT cdc_widen",
                        )
                        .await?;
                        tracing::warn!(table = %mirror.qualified, column = %column, error = %super::pg_detail(&e), "cannot widen the column to numeric; integers beyond 64 bits in it are rejected");
                    }
                }
            }
            mirror.numeric.insert(column);
        }
        Ok(())
    }

    async fn stage_and_merge(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        events: &[&ChangeEvent],
    ) -> Result<(), SinkError> {
        let table = &dest.table;
        if events.is_empty() {
            return Ok(());
        }
        // Convert every row before the COPY starts: a value that cannot be converted fails
        // this set cleanly, and the narrowing rejects just that change.
        let mut rows: Vec<Cow<Map<String, Value>>> = Vec::with_capacity(events.len());
        for e in events {
            let key = e.key.as_ref().expect("keyless changes are filtered out");
            // Deletes of mirrors stage their key; mapped deletes carry key and metadata.
            rows.push(match &e.after {
                None => Cow::Borrowed(key.as_object().expect("non-object keys are filtered out")),
                Some(after) => e
                    .sql_image(after, false)
                    .map_err(|reason| SinkError::Value {
                        table: table.to_string(),
                        reason,
                    })?,
            });
        }
        // Schemaless values into columns with real types (user-created or `column_types`).
        let coercions = self
            .mirrors
            .get(&dest.name)
            .and_then(|m| m.coercions.as_ref())
            .filter(|c| !c.is_empty());
        if let Some(coercions) = coercions {
            for (e, row) in events.iter().zip(rows.iter_mut()) {
                if e.schema.declared {
                    continue;
                }
                for (column, coercion) in coercions {
                    let Some(v) = row.get(column) else { continue };
                    let converted = coercion.convert(v).map_err(|reason| SinkError::Value {
                        table: table.to_string(),
                        reason: format!("column {column}: {reason}"),
                    })?;
                    if let Some(converted) = converted {
                        row.to_mut().insert(column.clone(), converted);
                    }
                }
            }
        }
        let soft_mapped = self
            .mirrors
            .get(&dest.name)
            .is_some_and(|m| m.mapped.is_some() && m.delete_mode == DeleteMode::Soft);
        carry_unchanged_toast(events, &mut rows, soft_mapped);
        tx.batch_execute("TRUNCATE pg_temp.cdc_stage")
            .await
            .map_err(pg_err(self.name, "clearing the staging table"))?;
        let sink = tx
            .copy_in("COPY pg_temp.cdc_stage FROM STDIN BINARY")
            .await
            .map_err(pg_err(self.name, "starting COPY into staging"))?;
        let writer = BinaryCopyInWriter::new(sink, STAGE_TYPES);
        futures::pin_mut!(writer);
        for (e, row) in events.iter().zip(&rows) {
            let key = e.key.as_ref().expect("keyless changes are filtered out");
            let ts = crate::db::pg_timestamp(e.source.ts_ms);
            let op = if e.op == Op::Delete { "d" } else { e.op.code() };
            let values: [&(dyn ToSql + Sync); 8] = [
                &op,
                &Json(key),
                &Json(&row),
                &e.position.commit_lsn,
                &e.position.change_lsn,
                &e.coords.partition,
                &e.coords.offset,
                &ts,
            ];
            writer
                .as_mut()
                .write(&values)
                .await
                .map_err(pg_err(self.name, "copying into staging"))?;
        }
        writer
            .finish()
            .await
            .map_err(pg_err(self.name, "finishing COPY into staging"))?;

        let mirror = self.mirrors.get_mut(&dest.name).expect("ensured before");
        if mirror.merge_sql.is_none() {
            let name = dest.name.clone();
            mirror.merge_sql = Some(match &mirror.mapped {
                None => merge_sql(mirror, &self.schema, &name),
                Some(mapped) => {
                    mapped_merge_sql(mirror, &self.schema, &name, mapped.filter.as_deref())
                }
            });
        }
        let sql = mirror.merge_sql.as_deref().expect("built above");
        tx.execute(sql, &[]).await.map_err(pg_err(
            self.name,
            format!("merging into {}", mirror.qualified),
        ))?;
        Ok(())
    }

    /// A truncate removes every row older than its position and records that position, so
    /// older changes arriving later (from another partition, or a replay) are not inserted.
    async fn truncate(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        e: &ChangeEvent,
    ) -> Result<(), SinkError> {
        let table = &dest.table;
        let position: [&(dyn ToSql + Sync); 2] = [&e.position.commit_lsn, &e.position.change_lsn];
        tx.execute(
            "INSERT INTO cdc_lake.truncations AS t (target_schema, mirror_table, commit_lsn, lsn)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (target_schema, mirror_table) DO UPDATE
                SET commit_lsn = excluded.commit_lsn, lsn = excluded.lsn
              WHERE (excluded.commit_lsn, excluded.lsn) > (t.commit_lsn, t.lsn)",
            &[&self.schema, &dest.name.clone(), position[0], position[1]],
        )
        .await
        .map_err(pg_err(
            self.name,
            format!("recording the truncate of {table}"),
        ))?;
        let mirror = match self
            .mirrors
            .get(&dest.name)
            .or_else(|| self.mapped_tables.get(table))
        {
            Some(m) => Cow::Borrowed(m),
            None => {
                // Not touched in this run yet: the table may still hold rows from before.
                let qualified = self.qualified(dest)?;
                let exists: bool = tx
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
                    .await
                    .map_err(pg_err(self.name, format!("looking up {qualified}")))?
                    .get(0);
                if !exists {
                    // Nothing mirrored yet, so nothing to remove.
                    return Ok(());
                }
                Cow::Owned(Mirror {
                    qualified,
                    columns: Vec::new(),
                    key: Vec::new(),
                    delete_mode: self.delete_mode,
                    mapped: None,
                    merge_sql: None,
                    numeric: Default::default(),
                    coercions: None,
                })
            }
        };
        let sql = match (&mirror.mapped, mirror.delete_mode) {
            (None, _) => format!(
                "DELETE FROM {} WHERE (cdc_commit_lsn, cdc_lsn) < ($1, $2)",
                mirror.qualified
            ),
            (Some(_), DeleteMode::Soft) => format!(
                "UPDATE {} SET {DELETED_COLUMN} = true WHERE {POSITION_COLUMN}[1:2] < ARRAY[$1, $2]",
                mirror.qualified
            ),
            (Some(_), _) => format!(
                "DELETE FROM {} WHERE {POSITION_COLUMN}[1:2] < ARRAY[$1, $2]",
                mirror.qualified
            ),
        };
        tx.execute(&sql, &position).await.map_err(pg_err(
            self.name,
            format!("truncating {}", mirror.qualified),
        ))?;
        Ok(())
    }
}

/// The SQL type `column_types` declares for a column of `table`.
fn declared_type<'a>(
    column_types: &'a BTreeMap<String, BTreeMap<String, String>>,
    table: &TableId,
    column: &str,
) -> Option<&'a str> {
    column_types
        .get(&table.to_string())?
        .get(column)
        .map(String::as_str)
}

/// A string as an SQL literal (for identifiers compared as values in generated SQL).
fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A TOAST placeholder means "unchanged since the previous image". The MERGE keeps the stored
/// value for it, but when that previous image is in this same batch (a snapshot read and its
/// update, say) only the newest staged row of a key reaches the MERGE: carry the earlier
/// staged value forward so the newest row is complete. With `fill_deletes` (a soft-deleting
/// mapping, whose deletes carry only key and metadata), a delete likewise takes the columns it
/// lacks from the earlier image, so the row it keeps is the row that was deleted. Changes of
/// one key share a partition, so batch order is their order.
fn carry_unchanged_toast(
    events: &[&ChangeEvent],
    rows: &mut [Cow<Map<String, Value>>],
    fill_deletes: bool,
) {
    let mut latest: HashMap<String, usize> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        let key = e.key.as_ref().map(Value::to_string).unwrap_or_default();
        if let (Some(after), Some(&prev)) = (&e.after, latest.get(&key)) {
            if events[prev].op != Op::Delete {
                let carried: Vec<(String, Value)> = if fill_deletes && e.op == Op::Delete {
                    rows[prev]
                        .iter()
                        .filter(|(c, _)| !after.contains_key(*c))
                        .map(|(c, v)| (c.clone(), v.clone()))
                        .collect()
                } else {
                    after
                        .iter()
                        .filter(|(_, v)| v.as_str() == Some(UNAVAILABLE_VALUE))
                        .filter_map(|(c, _)| Some((c.clone(), rows[prev].get(c)?.clone())))
                        .collect()
                };
                if !carried.is_empty() {
                    rows[i].to_mut().extend(carried);
                }
            }
        }
        latest.insert(key, i);
    }
}

/// Whether a source column has the name of one of a mirror's metadata columns.
fn is_metadata_column(column: &str) -> bool {
    META_COLUMNS.iter().any(|(m, _)| *m == column)
}

/// Why a change's key does not fit the mirror's primary key (the source key changed), or None.
/// Mapped tables build their key from the mapping, so it always fits.
fn key_mismatch(mirror: &Mirror, e: &ChangeEvent) -> Option<String> {
    if mirror.mapped.is_some() {
        return None;
    }
    let key = e.key.as_ref().and_then(Value::as_object)?;
    let mut got: Vec<&str> = key.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = mirror.key.iter().map(String::as_str).collect();
    got.sort_unstable();
    want.sort_unstable();
    (got != want).then(|| {
        format!(
            "cannot apply to {}: the change's key ({}) differs from the table's primary key ({}); the source key changed, so rebuild this mirror (docs/operations.md)",
            mirror.qualified,
            got.join(", "),
            want.join(", ")
        )
    })
}

/// Source columns may not use the names of cdc-lake's metadata columns (a backstop: such
/// changes are rejected one by one before the DDL).
fn check_not_metadata(table: &TableId, column: &str) -> Result<(), SinkError> {
    if is_metadata_column(column) {
        return Err(SinkError::Encode {
            table: table.to_string(),
            reason: format!(
                "source column {column} collides with cdc-lake's metadata columns (cdc_*)"
            ),
        });
    }
    Ok(())
}

/// The part both MERGEs share: the target, the newest staged change per key (with the row as
/// the table's columns, `extra` select items, and the table's truncate watermark), the key join.
///
/// The source's columns stay inside the composite `__cdc_r` and the staging columns inside
/// `__cdc_st`, so no source column name (`w_lsn`, `_cdc_op`, ...) can collide with a name the
/// statement uses itself.
fn merge_using(m: &Mirror, schema: &str, table: &str, extra: &str) -> String {
    let on: Vec<String> = m
        .key
        .iter()
        .map(|k| {
            let k = quote_ident(k).expect("validated when the table was registered");
            format!("m.{k} = {ROW}.{k}")
        })
        .collect();
    format!(
        "MERGE INTO {t} AS m
         USING (SELECT DISTINCT ON (st._cdc_key) st AS __cdc_st, r AS __cdc_r, w.commit_lsn AS __cdc_w_commit_lsn, w.lsn AS __cdc_w_lsn{extra}
                  FROM pg_temp.cdc_stage st
                  CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, st._cdc_row) AS r
                  LEFT JOIN cdc_lake.truncations w
                         ON w.target_schema = {schema_lit} AND w.mirror_table = {table_lit}
                 ORDER BY st._cdc_key, st._cdc_commit_lsn DESC, st._cdc_lsn DESC, st._cdc_offset DESC) AS s
            ON {on}",
        t = m.qualified,
        schema_lit = sql_literal(schema),
        table_lit = sql_literal(table),
        on = on.join(" AND "),
    )
}

/// The staged change's own columns (`_cdc_op`, `_cdc_row`, ...) in a MERGE.
const STAGED: &str = "(s.__cdc_st)";
/// The staged row as the target table's columns in a MERGE.
const ROW: &str = "(s.__cdc_r)";

/// Rows older than the table's last truncate stay gone.
const NEWER_THAN_TRUNCATE: &str = "(s.__cdc_w_commit_lsn IS NULL OR ((s.__cdc_st)._cdc_commit_lsn, (s.__cdc_st)._cdc_lsn) > (s.__cdc_w_commit_lsn, s.__cdc_w_lsn))";

/// Builds the one statement that applies a staged batch to a mirror.
/// `schema` and `table` (unquoted) key the mirror's truncate watermark.
fn merge_sql(m: &Mirror, schema: &str, table: &str) -> String {
    let q = |c: &str| quote_ident(c).expect("validated when the column was added");
    let guard = format!("(m.cdc_commit_lsn, m.cdc_lsn, m.cdc_kafka_offset) < ({STAGED}._cdc_commit_lsn, {STAGED}._cdc_lsn, {STAGED}._cdc_offset)");
    let meta_set = format!(
        "cdc_operation = {STAGED}._cdc_op, cdc_commit_lsn = {STAGED}._cdc_commit_lsn, cdc_lsn = {STAGED}._cdc_lsn, \
        cdc_source_ts = {STAGED}._cdc_source_ts, cdc_kafka_partition = {STAGED}._cdc_partition, \
        cdc_kafka_offset = {STAGED}._cdc_offset, cdc_synced_at = clock_timestamp()"
    );
    let set_clause = set_present_columns(m);
    let cols: Vec<String> = m.columns.iter().map(|c| q(c)).collect();
    let vals: Vec<String> = m
        .columns
        .iter()
        .map(|c| format!("{ROW}.{}", q(c)))
        .collect();
    let insert = format!(
        "INSERT ({}, cdc_operation, cdc_commit_lsn, cdc_lsn, cdc_source_ts, cdc_kafka_partition, cdc_kafka_offset, cdc_deleted, cdc_synced_at) \
         VALUES ({}, {STAGED}._cdc_op, {STAGED}._cdc_commit_lsn, {STAGED}._cdc_lsn, {STAGED}._cdc_source_ts, {STAGED}._cdc_partition, {STAGED}._cdc_offset, {STAGED}._cdc_op = 'd', clock_timestamp())",
        cols.join(", "),
        vals.join(", ")
    );
    let is_delete = format!("{STAGED}._cdc_op = 'd'");
    let (on_delete, insert_when) = match m.delete_mode {
        DeleteMode::Delete | DeleteMode::Ignore => {
            ("DELETE".to_string(), format!("AND NOT {is_delete}"))
        }
        // Soft deletes keep a row (inserted from the key if absent) so the ordering guard
        // still holds for late older changes.
        DeleteMode::Soft => (
            format!("UPDATE SET cdc_deleted = true, {meta_set}"),
            String::new(),
        ),
    };
    format!(
        "{using}
          WHEN MATCHED AND {is_delete} AND {guard} THEN {on_delete}
          WHEN MATCHED AND NOT {is_delete} AND {guard} THEN
               UPDATE SET {set_clause}cdc_deleted = false, {meta_set}
          WHEN NOT MATCHED {insert_when} AND {NEWER_THAN_TRUNCATE} THEN {insert}",
        using = merge_using(m, schema, table, ""),
    )
}

/// `col = <staged value if the staged row has it, else the stored one>, ` for each non-key
/// column: a column missing from the staged row was a TOAST placeholder (or, for a mapped
/// delete, a data column the delete does not carry).
fn set_present_columns(m: &Mirror) -> String {
    let mut out = String::new();
    for c in m.columns.iter().filter(|c| !m.key.contains(c)) {
        out.push_str(&format!(
            "{0} = CASE WHEN {STAGED}._cdc_row ? {1} THEN {ROW}.{0} ELSE m.{0} END, ",
            quote_ident(c).expect("validated when the column was added"),
            sql_literal(c)
        ));
    }
    out
}

/// The MERGE of a mapped table: the mirrors' statement with the row filter, the mapping's
/// delete policy, and the ordering guard in `__cdc_position`.
fn mapped_merge_sql(m: &Mirror, schema: &str, table: &str, filter: Option<&str>) -> String {
    let q = |c: &str| quote_ident(c).expect("validated with the mapping");
    let set_clause = set_present_columns(m);
    let guard = format!("coalesce(m.{POSITION_COLUMN}, '{{}}') < s.__cdc_pos");
    // The filter sees the mapped row's columns by name (the inner FROM shadows the rest).
    let keep = match filter {
        Some(f) => format!("coalesce((SELECT ({f}) FROM (SELECT r.*) AS row_), false)"),
        None => "true".into(),
    };
    let undelete = if m.delete_mode == DeleteMode::Soft {
        format!(", {DELETED_COLUMN} = false")
    } else {
        String::new()
    };
    let gone = match m.delete_mode {
        DeleteMode::Delete => "DELETE".to_string(),
        DeleteMode::Soft => format!(
            "UPDATE SET {set_clause}{DELETED_COLUMN} = true, {POSITION_COLUMN} = s.__cdc_pos"
        ),
        // Deletes never reach the MERGE; a row that stops matching the filter stays as it was.
        DeleteMode::Ignore => "DO NOTHING".to_string(),
    };
    // A soft-deleting mapping keeps a deleted row even when its insert and delete arrive in
    // one batch (the delete carries the earlier image's columns, see carry_unchanged_toast).
    let is_delete = format!("{STAGED}._cdc_op = 'd'");
    let (insert_when, deleted_col, deleted_val) = if m.delete_mode == DeleteMode::Soft {
        (
            String::new(),
            format!(", {DELETED_COLUMN}"),
            format!(", {is_delete}"),
        )
    } else {
        (format!("AND NOT {is_delete}"), String::new(), String::new())
    };
    let cols: Vec<String> = m.columns.iter().map(|c| q(c)).collect();
    let vals: Vec<String> = m
        .columns
        .iter()
        .map(|c| format!("{ROW}.{}", q(c)))
        .collect();
    let extra = format!(
        ",
                       ARRAY[st._cdc_commit_lsn, st._cdc_lsn, st._cdc_offset] AS __cdc_pos,
                       {keep} AS __cdc_keep"
    );
    format!(
        "{using}
          WHEN MATCHED AND ({is_delete} OR NOT s.__cdc_keep) AND {guard} THEN {gone}
          WHEN MATCHED AND {guard} THEN
               UPDATE SET {set_clause}{POSITION_COLUMN} = s.__cdc_pos{undelete}
          WHEN NOT MATCHED {insert_when} AND s.__cdc_keep AND {NEWER_THAN_TRUNCATE}
          THEN INSERT ({cols}, {POSITION_COLUMN}{deleted_col}) VALUES ({vals}, s.__cdc_pos{deleted_val})",
        using = merge_using(m, schema, table, &extra),
        cols = cols.join(", "),
        vals = vals.join(", "),
    )
}

/// Records a change the mirror cannot take, with the reason, in the same transaction.
async fn reject(
    tx: &Transaction<'_>,
    sink: &'static str,
    e: &ChangeEvent,
    reason: &str,
) -> Result<(), SinkError> {
    tx.execute(
        "INSERT INTO cdc_raw.cdc_rejects
             (kafka_topic, kafka_partition, kafka_offset, kafka_timestamp, raw_key, raw_value, stage, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT DO NOTHING",
        &[
            &e.coords.topic,
            &e.coords.partition,
            &e.coords.offset,
            &crate::db::pg_timestamp(e.coords.timestamp_ms),
            &e.raw_key.as_deref().map(str::as_bytes),
            &e.raw_value.as_bytes(),
            &sink,
            &crate::db::pg_text(reason).as_ref(),
        ],
    )
    .await
    .map_err(pg_err(sink, "recording a reject"))?;
    Ok(())
}

impl Sink for StateSink {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn checkpoints(&mut self, partitions: &[TopicPartition]) -> Result<Offsets, SinkError> {
        self.connect().await?;
        let client = self.client.as_ref().expect("connected");
        checkpoint::load(client, self.name, &self.consumer, partitions).await
    }

    async fn write(&mut self, batch: &Batch) -> Result<Ack, SinkError> {
        if batch.is_empty() {
            return Ok(Ack::default());
        }
        let result = self.write_inner(batch, true).await;
        if result.as_ref().is_err_and(SinkError::needs_reconnect) {
            self.client = None;
        }
        result
    }

    async fn flush(&mut self, _force: bool) -> Result<Ack, SinkError> {
        Ok(Ack::default())
    }

    fn revoke(&mut self, _partitions: &[TopicPartition]) {}
}
