//! One source per mirror: the first change to reach a mirror records its source database in
//! `cdc_lake.mirror_sources`, and changes of any other source are rejected with advice. Only
//! then do the ordering guard and the truncate watermark compare positions of one WAL.

use std::collections::BTreeSet;

use tokio_postgres::Transaction;

use super::{pg_err, Dest, StateSink};
use crate::domain::{SourceDb, TableId};
use crate::envelope::ChangeEvent;
use crate::naming::MirrorNaming;
use crate::sink::ident::quote_ident;
use crate::sink::{ErrorClass, Savepoint, SinkError, WriteStats};

/// The source a mirror belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Owner {
    source: SourceDb,
    table: TableId,
}

impl StateSink {
    /// The changes of `events` that belong to the mirror's source; the others are rejected
    /// with the reason. The mirror is claimed for the first change's source if nobody has it.
    /// Mapped tables take what their mappings send them.
    pub(super) async fn own_source_only<'e>(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        events: Vec<&'e ChangeEvent>,
        stats: &mut WriteStats,
    ) -> Result<Vec<&'e ChangeEvent>, SinkError> {
        if self.mapped_tables.contains_key(&dest.table) || events.is_empty() {
            return Ok(events);
        }
        if quote_ident(&dest.name).is_err() {
            // No mirror can have this name: apply_changes rejects each change with the reason.
            return Ok(events);
        }
        let owner = match self.owners.get(&dest.name) {
            Some(o) => o.clone(),
            None => {
                let claimant = Owner {
                    source: events[0].source_db(),
                    table: dest.table.clone(),
                };
                // In a savepoint: a source name PostgreSQL cannot store as text (a NUL byte)
                // rejects these changes instead of failing the batch.
                let attempt = Savepoint::begin(tx, self.name, "cdc_claim").await?;
                match self.claim(tx, dest, claimant).await {
                    Ok(owner) => {
                        attempt.release().await?;
                        self.owners.insert(dest.name.clone(), owner.clone());
                        owner
                    }
                    Err(e) if e.class() == ErrorClass::BadData => {
                        attempt.rollback().await?;
                        let reason = format!(
                            "cannot apply to {}.{} (source {}): {e}; the raw log and the lake keep the change",
                            self.schema, dest.name, dest.table
                        );
                        for ev in events {
                            self.reject_one(tx, ev, &reason, stats).await?;
                        }
                        return Ok(Vec::new());
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let mut own = Vec::with_capacity(events.len());
        for e in events {
            // Compared without allocating: this runs for every change.
            let same = e.source.name.as_deref().unwrap_or("") == owner.source.server
                && e.source.db.as_deref().unwrap_or("") == owner.source.db
                && e.table == owner.table;
            if same {
                own.push(e);
            } else {
                let reason = self.foreign_source_reason(dest, &owner, &e.source_db());
                self.reject_one(tx, e, &reason, stats).await?;
            }
        }
        Ok(own)
    }

    /// Records `claimant` as the mirror's source unless one is recorded; returns the owner.
    async fn claim(
        &self,
        tx: &Transaction<'_>,
        dest: &Dest,
        claimant: Owner,
    ) -> Result<Owner, SinkError> {
        let context = || format!("recording the source of {}.{}", self.schema, dest.name);
        tx.execute(
            "INSERT INTO cdc_lake.mirror_sources
                 (target_schema, mirror_table, source_server, source_db, source_schema, source_table)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (target_schema, mirror_table) DO NOTHING",
            &[
                &self.schema,
                &dest.name,
                &claimant.source.server,
                &claimant.source.db,
                &claimant.table.schema,
                &claimant.table.table,
            ],
        )
        .await
        .map_err(pg_err(self.name, context()))?;
        let row = tx
            .query_one(
                "SELECT source_server, source_db, source_schema, source_table
                   FROM cdc_lake.mirror_sources WHERE target_schema = $1 AND mirror_table = $2",
                &[&self.schema, &dest.name],
            )
            .await
            .map_err(pg_err(self.name, context()))?;
        let owner = Owner {
            source: SourceDb {
                server: row.get(0),
                db: row.get(1),
            },
            table: TableId::new(row.get::<_, String>(2), row.get::<_, String>(3)),
        };
        if owner == claimant {
            tracing::debug!(mirror = %dest.name, source = %owner.source, "mirror source recorded");
        }
        Ok(owner)
    }

    fn foreign_source_reason(&self, dest: &Dest, owner: &Owner, source: &SourceDb) -> String {
        let section = if self.name == super::NAME {
            "state".to_string()
        } else {
            format!("targets.{}", self.name.trim_start_matches("state:"))
        };
        let advice = if self.naming.is_source_aware() {
            format!("{section}.table_name names both with one mirror; make it tell them apart")
        } else {
            format!(
                "set {section}.table_name to a template with {{server}} or {{db}}, e.g. \"{{db}}.{{schema}}.{{table}}\", to mirror each source database on its own"
            )
        };
        format!(
            "cannot apply to {}.{} (source {} of {source}): the mirror belongs to {} of {}, and positions of two sources cannot be compared; {advice}; the raw log and the lake keep the change",
            self.schema, dest.name, dest.table, owner.table, owner.source
        )
    }
}

/// The mirrors of `tables` in `schema`: those recorded in `cdc_lake.mirror_sources`, plus the
/// names `naming` gives them when names do not depend on the source database. Sorted.
pub async fn mirror_names(
    client: &tokio_postgres::Client,
    schema: &str,
    naming: &MirrorNaming,
    tables: &BTreeSet<TableId>,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut names = BTreeSet::new();
    if !naming.is_source_aware() {
        for t in tables {
            names.insert(naming.mirror_name(&SourceDb::default(), t));
        }
    }
    let rows = client
        .query(
            "SELECT mirror_table, source_schema, source_table
               FROM cdc_lake.mirror_sources WHERE target_schema = $1",
            &[&schema],
        )
        .await?;
    for r in rows {
        if tables.contains(&TableId::new(r.get::<_, String>(1), r.get::<_, String>(2))) {
            names.insert(r.get(0));
        }
    }
    Ok(names.into_iter().collect())
}

/// The mirror of `table` from source database `db` in `schema`, if one is recorded.
pub async fn recorded_mirror(
    client: &tokio_postgres::Client,
    schema: &str,
    db: &str,
    table: &TableId,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT mirror_table FROM cdc_lake.mirror_sources
              WHERE target_schema = $1 AND source_db = $2 AND source_schema = $3 AND source_table = $4
              ORDER BY mirror_table LIMIT 1",
            &[&schema, &db, &table.schema, &table.table],
        )
        .await?
        .map(|r| r.get(0)))
}

/// Gives the mirrors `names` of schema `to` the sources recorded for them in `from` (a
/// scratch copy of a target then claims exactly as the target did).
pub async fn copy_sources(
    client: &tokio_postgres::Client,
    from: &str,
    to: &str,
    names: &[String],
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO cdc_lake.mirror_sources
                 (target_schema, mirror_table, source_server, source_db, source_schema, source_table)
             SELECT $2, mirror_table, source_server, source_db, source_schema, source_table
               FROM cdc_lake.mirror_sources
              WHERE target_schema = $1 AND mirror_table = ANY($3)
             ON CONFLICT DO NOTHING",
            &[&from, &to, &names],
        )
        .await
}

/// Forgets every mirror source of `schema` (a dropped scratch schema).
pub async fn forget_sources(
    client: &tokio_postgres::Client,
    schema: &str,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM cdc_lake.mirror_sources WHERE target_schema = $1",
            &[&schema],
        )
        .await
}
