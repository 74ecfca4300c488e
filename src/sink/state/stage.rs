//! Staging: each change's row converted for its table and copied (binary COPY) into the
//! session's staging table, then merged.

use std::borrow::Cow;
use std::collections::HashMap;

use postgres_types::{Json, ToSql, Type};
use serde_json::{Map, Value};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::Transaction;

use super::{merge_sql, pg_err, Dest, StateSink};
use crate::config::DeleteMode;
use crate::envelope::value::UNAVAILABLE_VALUE;
use crate::envelope::{ChangeEvent, Op};
use crate::sink::SinkError;

pub(super) const STAGE_DDL: &str = "CREATE TEMP TABLE IF NOT EXISTS cdc_stage (
    _cdc_op text NOT NULL,
    _cdc_key jsonb NOT NULL,
    _cdc_row jsonb NOT NULL,
    _cdc_commit_lsn bigint NOT NULL,
    _cdc_lsn bigint NOT NULL,
    _cdc_partition integer NOT NULL,
    _cdc_offset bigint NOT NULL,
    _cdc_source_ts timestamptz
) ON COMMIT DELETE ROWS";
pub(super) const STAGE_TYPES: &[Type] = &[
    Type::TEXT,
    Type::JSONB,
    Type::JSONB,
    Type::INT8,
    Type::INT8,
    Type::INT4,
    Type::INT8,
    Type::TIMESTAMPTZ,
];

impl StateSink {
    pub(super) async fn stage_and_merge(
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
                None => merge_sql::mirror_merge_sql(mirror, &self.schema, &name),
                Some(mapped) => merge_sql::mapped_merge_sql(
                    mirror,
                    &self.schema,
                    &name,
                    mapped.filter.as_deref(),
                ),
            });
        }
        let sql = mirror.merge_sql.as_deref().expect("built above");
        tx.execute(sql, &[]).await.map_err(pg_err(
            self.name,
            format!("merging into {}", mirror.qualified),
        ))?;
        Ok(())
    }
}

/// A TOAST placeholder means "unchanged since the previous image". The MERGE keeps the stored
/// value for it, but when that previous image is in this same batch (a snapshot read and its
/// update, say) only the newest staged row of a key reaches the MERGE: carry the earlier
/// staged value forward so the newest row is complete. With `fill_deletes` (a soft-deleting
/// mapping, whose deletes carry only key and metadata), a delete likewise takes the columns it
/// lacks from the earlier image, so the row it keeps is the row that was deleted. Changes of
/// one key share a partition, so batch order is their order.
pub(super) fn carry_unchanged_toast(
    events: &[&ChangeEvent],
    rows: &mut [Cow<Map<String, Value>>],
    fill_deletes: bool,
) {
    // Only placeholders and filled deletes carry anything: most sets have neither, and then
    // no key needs rendering.
    let has_placeholder = |e: &&ChangeEvent| {
        e.after
            .as_ref()
            .is_some_and(|a| a.values().any(|v| v.as_str() == Some(UNAVAILABLE_VALUE)))
    };
    if !fill_deletes && !events.iter().any(has_placeholder) {
        return;
    }
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
