//! Applying one table's changes inside the batch's transaction: split at truncates, set-based
//! with bisection down to the changes that fail, each reject with the table and column.

use std::borrow::Cow;
use std::collections::HashSet;

/// Column names already checked, hashed fast: the set is probed once per column per change.
type NameSet<'a> = HashSet<&'a str, foldhash::fast::RandomState>;

use postgres_types::{Json, ToSql};
use serde_json::Value;
use tokio_postgres::Transaction;

use super::catalog::is_metadata_column;
use super::{pg_err, reject, Dest, Mirror, StateSink};
use crate::config::DeleteMode;
use crate::domain::Ident;
use crate::envelope::{ChangeEvent, Op};
use crate::sink::ident::quote_ident;
use crate::sink::mapping::{DELETED_COLUMN, POSITION_COLUMN};
use crate::sink::{Bisect, ErrorClass, Savepoint, SinkError, WriteStats};

impl StateSink {
    /// Applies one table's changes, split at truncates (which must apply in order).
    pub(super) async fn apply_table(
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
                    let attempt = Savepoint::begin(tx, self.name, "cdc_truncate").await?;
                    match self.truncate(tx, dest, e).await {
                        Ok(()) => {
                            attempt.release().await?;
                            stats.written += 1;
                        }
                        Err(err) if err.class() == ErrorClass::BadData => {
                            attempt.rollback().await?;
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
    pub(super) async fn apply_changes(
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
        let mut usable_columns = NameSet::default();
        let unusable_mirror_name = self.unusable_mirror_name(dest);
        for e in events {
            let unusable = match &unusable_mirror_name {
                Some(reason) => Some(reason.clone()),
                None => self.unusable_columns(dest, e, &mut usable_columns),
            };
            match unusable {
                None => usable.push(*e),
                Some(reason) => self.reject_one(tx, e, &reason, stats).await?,
            }
        }
        let mut bisect = Bisect::new(usable.len());
        let mut narrowed = false;
        let mut reread = false;
        while let Some(range) = bisect.next_range() {
            // DDL inside a rolled-back savepoint is undone: so is what the cache learnt.
            let cached = self.mirrors.get(&dest.name).cloned();
            let attempt = Savepoint::begin(tx, self.name, "cdc_apply").await?;
            match self.apply_set(tx, dest, &usable[range.clone()]).await {
                Ok(not_applied) => {
                    attempt.release().await?;
                    stats.written += (range.len() - not_applied.len()) as u64;
                    for (i, reason) in not_applied {
                        self.reject_one(tx, usable[range.start + i], &reason, stats)
                            .await?;
                    }
                }
                Err(e) if e.class() == ErrorClass::BadData => {
                    attempt.rollback().await?;
                    match cached {
                        Some(m) => self.mirrors.insert(dest.name.clone(), m),
                        None => self.mirrors.remove(&dest.name),
                    };
                    // The pod stages in the column types it read when it first wrote the table.
                    // An operator may have changed one since (the fix for a `state` reject): on
                    // the first failure the table is read again, and if it changed, the same
                    // changes are tried again with the new types before any is rejected.
                    if !reread {
                        reread = true;
                        if self.staged_shape_is_stale(tx, dest).await? {
                            tracing::info!(table = %table, "the table's columns changed since the pod read them; staging with the new ones");
                            self.mirrors.remove(&dest.name);
                            bisect.retry(range);
                            continue;
                        }
                    }
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
    /// changes (by index) not applied, with the reason: their key does not match the table's
    /// primary key, or their source started over below the mirror's positions.
    pub(super) async fn apply_set(
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
        let rewound = self.stage_and_merge(tx, dest, &keyed).await?;
        for r in rewound {
            let at = events
                .iter()
                .position(|e| e.coords.partition == r.partition && e.coords.offset == r.offset);
            mismatched.extend(at.map(|i| (i, r.reason)));
        }
        Ok(mismatched)
    }

    /// Why no mirror can be named for this table (too long, NUL), or None. Mapped tables have
    /// their names from the mapping.
    fn unusable_mirror_name(&self, dest: &Dest) -> Option<String> {
        let table = &dest.table;
        if self.mapped_tables.contains_key(table) {
            return None;
        }
        quote_ident(&dest.name)
            .err()
            .map(|reason| format!("{table} cannot be mirrored: the mirror name {reason}"))
    }

    /// Why no mirror can take this change's column names (too long, NUL, a metadata column's
    /// name), or None. Mapped tables have their columns from the mapping. `usable_columns`
    /// holds the names already found usable for this table, so that a set of changes checks
    /// each distinct name once.
    fn unusable_columns<'e>(
        &self,
        dest: &Dest,
        e: &'e ChangeEvent,
        usable_columns: &mut NameSet<'e>,
    ) -> Option<String> {
        let table = &dest.table;
        if self.mapped_tables.contains_key(table) {
            return None;
        }
        let name = &dest.name;
        let key = e.key.as_ref().and_then(Value::as_object);
        let columns = key
            .into_iter()
            .chain(e.before.as_ref())
            .chain(e.after.as_ref())
            .flat_map(|m| m.keys());
        for c in columns {
            if usable_columns.contains(c.as_str()) {
                continue;
            }
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
            usable_columns.insert(c.as_str());
        }
        None
    }

    /// The reason a single change failed, naming the table and, for a value, the column.
    pub(super) async fn reject_reason(
        &self,
        tx: &Transaction<'_>,
        dest: &Dest,
        e: &ChangeEvent,
        err: &SinkError,
    ) -> String {
        let table = &dest.table;
        let detail = match err {
            SinkError::Postgres { source, .. } => crate::sink::pg_detail(source),
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
    pub(super) async fn reject_one(
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

    /// The first column of a change whose value its mirror column cannot hold, found by
    /// converting one value at a time (only on the error path), so the reject names it.
    pub(super) async fn bad_column(
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
            if !mirror.has_column(col) {
                continue;
            }
            let attempt = Savepoint::begin(tx, self.name, "cdc_probe").await.ok()?;
            let one = serde_json::json!({ col: v });
            let fits = tx.execute(&probe, &[&Json(&one)]).await.is_ok();
            attempt.rollback().await.ok()?;
            if !fits {
                return Some(col.clone());
            }
        }
        None
    }

    /// A truncate removes every row older than its position and records that position, so
    /// older changes arriving later (from another partition, or a replay) are not inserted.
    pub(super) async fn truncate(
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
                    applier: None,
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

/// Why a change's key does not fit the mirror's primary key (the source key changed), or None.
/// Mapped tables build their key from the mapping, so it always fits.
pub(super) fn key_mismatch(mirror: &Mirror, e: &ChangeEvent) -> Option<String> {
    if mirror.mapped.is_some() {
        return None;
    }
    let key = e.key.as_ref().and_then(Value::as_object)?;
    let mut got: Vec<&str> = key.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = mirror.key.iter().map(Ident::name).collect();
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
