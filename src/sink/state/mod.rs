//! Current state: `cdc_processed.<table>` mirrors, applied set-based per batch.
//!
//! Per table and batch: binary COPY of the changes into a temporary staging table, then one
//! `MERGE` that keeps the last change per key and inserts, updates or deletes, guarded by the
//! source position so that replays and duplicates never move a row backwards. The checkpoint
//! advances in the same transaction.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio_postgres::{Client, Transaction};

mod apply;
mod catalog;
mod copy_text;
mod merge_sql;
pub mod sources;
mod stage;
mod staging;
mod target;

pub use catalog::pg_type;
pub(crate) use catalog::PRIMARY_KEY_COLUMNS;

use super::coerce::ColumnCoercion;
use super::mapping::Mapping;
use super::{checkpoint, Ack, Offsets, Sink, SinkError, WriteStats};
use crate::batch::Batch;
use crate::config::{
    DeleteMode, PostgresConfig, StateConfig, Target, TimePrecisionMode, PROCESSED_TARGET,
};
use crate::domain::{Ident, LogBounds, TableId, TopicPartition};
use crate::envelope::ChangeEvent;
use crate::naming::MirrorNaming;

pub const NAME: &str = "state";

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
    columns: Vec<Ident>,
    key: Vec<Ident>,
    delete_mode: DeleteMode,
    /// The mapping's row filter; `None` for mirrors.
    mapped: Option<MappedTable>,
    /// Its staging table and MERGE; None until first needed and after its columns change.
    applier: Option<std::sync::Arc<stage::Applier>>,
    /// Columns known to be `numeric` already, so integers beyond 64 bits fit them.
    numeric: std::collections::BTreeSet<String>,
    /// How schemaless values convert to the mirror's column types, by column (read from the
    /// catalog after the table is made to fit; None until then).
    coercions: Option<HashMap<String, ColumnCoercion>>,
}

impl Mirror {
    /// Whether the table has this source (or mapped) column.
    fn has_column(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c == name)
    }
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
    /// Partitions whose log started over (`rebase`), for the rest of this pod's life: a source
    /// created again or restored starts its positions over with its topics, and the mirror's
    /// ordering guard would keep the old source's rows. Each batch of theirs is checked for
    /// that after its MERGE (one more join, only after such an incident).
    rewind_watch: HashSet<TopicPartition>,
    prepared: bool,
}

/// A name of the mirror of `table` (its schema, its name, a column) as an identifier, or the
/// error that rejects the table's changes at this sink, naming the table.
fn ident_for(table: &TableId, name: &str) -> Result<Ident, SinkError> {
    Ident::new(name).map_err(|e| SinkError::Encode {
        table: table.to_string(),
        reason: e.to_string(),
    })
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
            rewind_watch: HashSet::new(),
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
        Ok(format!(
            "{}.{}",
            ident_for(&dest.table, &self.schema)?,
            ident_for(&dest.table, &dest.name)?
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
            let schema = Ident::new(self.schema.as_str()).map_err(|e| SinkError::Mapping {
                target: self.name,
                reason: format!("the target schema: {e}"),
            })?;
            client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await
                .map_err(pg_err(self.name, "creating the target schema"))?;
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
                if let Some(e) = stats.change(r) {
                    changes.push(e);
                }
            }
            let mapped;
            if !self.mappings.is_empty() {
                mapped = self.map_changes(&tx, &changes, &mut stats).await?;
                changes = mapped.iter().collect();
            }
            // Changes per destination table, in Kafka order.
            // Names depend on (server, database, table) only: computed once per batch for each.
            let mut dests: HashMap<SourceTable, Dest> = HashMap::new();
            let mut by_dest: BTreeMap<Dest, Vec<&ChangeEvent>> = BTreeMap::new();
            // Consecutive changes mostly share a table: a run of them is named and grouped once.
            let mut runs: Vec<(SourceTable, Vec<&ChangeEvent>)> = Vec::new();
            for e in changes {
                let source = (
                    e.source.name.as_deref().unwrap_or(""),
                    e.source.db.as_deref().unwrap_or(""),
                    &e.table,
                );
                match runs.last_mut() {
                    Some((current, events)) if *current == source => events.push(e),
                    _ => runs.push((source, vec![e])),
                }
            }
            for (source, events) in runs {
                let dest = dests
                    .entry(source)
                    .or_insert_with(|| self.dest_of(events[0]));
                match by_dest.get_mut(dest) {
                    Some(all) => all.extend(events),
                    None => {
                        by_dest.insert(dest.clone(), events);
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
}

/// A change's table as its source names it: server (`source.name`), database, table.
type SourceTable<'a> = (&'a str, &'a str, &'a TableId);

/// Records a change the mirror cannot take, with the reason, in the same transaction (the
/// sink's name is the reject's stage).
async fn reject(
    tx: &Transaction<'_>,
    sink: &'static str,
    e: &ChangeEvent,
    reason: &str,
) -> Result<(), SinkError> {
    super::record_reject(tx, sink, sink, e, reason).await
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

    /// The watch of a partition whose log started over stays (`rewind_watch`): the group may
    /// take the partition away and give it back, and its checkpoint no longer shows the reset.
    fn revoke(&mut self, _partitions: &[TopicPartition]) {}

    /// Rows need nothing: the ordering guard compares source positions (LSNs) before offsets,
    /// so the new log's changes apply over what the old one left. Unless the source started
    /// over with its log: the partition is watched (`rewind_watch`). Rejects at reused
    /// offsets move aside, so the new log's rejects can be recorded.
    async fn rebase(
        &mut self,
        tp: &TopicPartition,
        stale: i64,
        log: LogBounds,
    ) -> Result<Option<i64>, SinkError> {
        self.connect().await?;
        let name = self.name;
        let consumer = self.consumer.clone();
        let client = self.client.as_mut().expect("connected");
        let tx = client
            .transaction()
            .await
            .map_err(pg_err(name, "beginning"))?;
        let (next, moved) = checkpoint::rebase(&tx, name, &consumer, tp, stale, log).await?;
        if moved {
            super::supersede_rejects(&tx, name, &[name], tp, log.start).await?;
        }
        tx.commit().await.map_err(pg_err(name, "committing"))?;
        if moved {
            self.rewind_watch.insert(tp.clone());
        }
        Ok(Some(next))
    }
}
