//! Opening a target: its setup SQL, its mappings checked against the catalog, and what the
//! target's configuration says about a change (mapped rows, delete policy, configured keys).

use serde_json::{Map, Value};
use tokio_postgres::{Client, Transaction};

use super::{reject, MappedTable, Mirror, StateSink, NAME};
use crate::config::DeleteMode;
use crate::domain::{Ident, TableId};
use crate::envelope::ChangeEvent;
use crate::sink::{SinkError, WriteStats};

/// Advisory lock key held while a target's setup SQL runs (arbitrary constant).
pub(super) const SETUP_LOCK: i64 = 7_220_211_006;

impl StateSink {
    pub(super) async fn prepare_mappings(&mut self, client: &Client) -> Result<(), SinkError> {
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
                    crate::sink::pg_detail(&e)
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
            let ident =
                |name: &str| Ident::new(name).map_err(|e| fail(format!("{}: {e}", m.label)));
            let idents = |names: &[String]| -> Result<Vec<Ident>, SinkError> {
                names.iter().map(|c| ident(c)).collect()
            };
            let mirror = Mirror {
                qualified: format!("{}.{}", ident(&self.schema)?, ident(&m.table)?),
                columns: idents(&m.target_columns())?,
                key: idents(&m.key)?,
                delete_mode: m.delete,
                mapped: Some(MappedTable {
                    filter: m.filter.clone(),
                }),
                applier: None,
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

    /// Each change as the rows of the mappings of its topic (none matching: skipped and
    /// counted). A change a mapping cannot convert is rejected with the reason.
    pub(super) async fn map_changes(
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
    pub(super) fn delete_mode_of(&self, table: &TableId) -> DeleteMode {
        self.mapped_tables
            .get(table)
            .map_or(self.delete_mode, |m| m.delete_mode)
    }

    /// The key of a change of a keyless table, from `key_columns`; the error is the reject
    /// reason.
    pub(super) fn configured_key(
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
}
