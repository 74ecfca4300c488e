//! Staging: each change's row converted for its table and copied (COPY text, typed columns)
//! into the table shape's staging table, then merged.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::SinkExt;
use serde_json::{Map, Value};
use tokio_postgres::Transaction;

use super::copy_text::{push_value, NULL};
use super::staging::StagePlan;
use super::{merge_sql, pg_err, Dest, StateSink};
use crate::config::DeleteMode;
use crate::envelope::value::UNAVAILABLE_VALUE;
use crate::envelope::{ChangeEvent, Op};
use crate::sink::SinkError;

/// How one table's changes are applied: its staging table and its MERGE, built from the
/// catalog when the table is first written in a session or its columns change.
#[derive(Debug)]
pub(super) struct Applier {
    plan: StagePlan,
    merge: String,
    /// Finds the changes the MERGE held back although they are newer (a source that started
    /// over); mirrors only: a mapped table keeps no commit time.
    rewound: Option<String>,
    /// By staged column: whether the MERGE updates it, so a row lacking it must say so.
    updated: Vec<bool>,
}

/// A staged change the ordering guard held back although its source started over: where it
/// is, and why it is rejected.
pub(super) struct Rewound {
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
}

/// A WAL position as PostgreSQL writes it (`16/B374D848`).
fn lsn_text(lsn: i64) -> String {
    format!("{:X}/{:X}", (lsn as u64) >> 32, (lsn as u64) & 0xFFFF_FFFF)
}

/// COPY data is sent in pieces of about this size: PostgreSQL parses one while the next is
/// written, and buffers this small are reused by the allocator rather than faulted in fresh.
const COPY_CHUNK: usize = 64 * 1024;

impl StateSink {
    pub(super) async fn stage_and_merge(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
        events: &[&ChangeEvent],
    ) -> Result<Vec<Rewound>, SinkError> {
        let table = &dest.table;
        if events.is_empty() {
            return Ok(Vec::new());
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

        let applier = self.applier(tx, dest).await?;
        let plan = &applier.plan;
        tx.batch_execute(&format!("{}; TRUNCATE {}", plan.create, plan.table))
            .await
            .map_err(pg_err(self.name, "preparing the staging table"))?;
        let sink = tx
            .copy_in(&format!("COPY {} FROM STDIN", plan.table))
            .await
            .map_err(pg_err(self.name, "starting COPY into staging"))?;
        futures::pin_mut!(sink);
        let mirror = self.mirrors.get(&dest.name).expect("ensured before");
        let mut buf = Vec::with_capacity(2 * COPY_CHUNK);
        let mut layout = RowLayout::default();
        let mut slots = Vec::new();
        for (e, row) in events.iter().zip(&rows) {
            staged_line(&mut buf, &applier, &mut layout, &mut slots, e, row);
            if buf.len() >= COPY_CHUNK {
                let chunk = Bytes::from(std::mem::replace(
                    &mut buf,
                    Vec::with_capacity(2 * COPY_CHUNK),
                ));
                sink.send(chunk)
                    .await
                    .map_err(pg_err(self.name, "copying into staging"))?;
            }
        }
        if !buf.is_empty() {
            sink.send(Bytes::from(buf))
                .await
                .map_err(pg_err(self.name, "copying into staging"))?;
        }
        sink.finish()
            .await
            .map_err(pg_err(self.name, "finishing COPY into staging"))?;
        tx.execute(&applier.merge, &[]).await.map_err(pg_err(
            self.name,
            format!("merging into {}", mirror.qualified),
        ))?;
        match &applier.rewound {
            Some(sql) if self.watches_any(events) => self.rewound(tx, dest, sql).await,
            _ => Ok(Vec::new()),
        }
    }

    /// Whether a change of `events` comes from a partition whose log started over since this
    /// pod started (see `rewind_watch`).
    fn watches_any(&self, events: &[&ChangeEvent]) -> bool {
        !self.rewind_watch.is_empty()
            && events.iter().any(|e| {
                self.rewind_watch
                    .iter()
                    .any(|tp| tp.partition == e.coords.partition && tp.topic == e.coords.topic)
            })
    }

    /// The changes just merged that the ordering guard held back although their source
    /// started over, each with its reason.
    async fn rewound(
        &self,
        tx: &Transaction<'_>,
        dest: &Dest,
        sql: &str,
    ) -> Result<Vec<Rewound>, SinkError> {
        let mirror = self.mirrors.get(&dest.name).expect("ensured before");
        let rows = tx.query(sql, &[]).await.map_err(pg_err(
            self.name,
            format!("comparing positions with {}", mirror.qualified),
        ))?;
        let found: Vec<Rewound> = rows
            .iter()
            .map(|r| {
                let (change, row): (i64, i64) = (r.get(2), r.get(3));
                Rewound {
                    partition: r.get(0),
                    offset: r.get(1),
                    reason: format!(
                        "{}: the change is behind the mirror's row in source position (commit LSN {} < {}) but was committed later: the source database was created again or restored to an earlier point, so its positions started over and the ordering guard would keep the old row; rebuild the mirror (docs/operations.md, \"A source that started over\")",
                        mirror.qualified,
                        lsn_text(change),
                        lsn_text(row),
                    ),
                }
            })
            .collect();
        if let Some(first) = found.first() {
            tracing::error!(
                sink = self.name,
                table = %dest.table,
                mirror = %mirror.qualified,
                changes = found.len(),
                partition = first.partition,
                offset = first.offset,
                "the source started over below the mirror's positions (created again, or restored to an earlier point): its changes to rows the mirror holds are rejected instead of held back by the ordering guard; rebuild the mirror (docs/operations.md, \"A source that started over\")"
            );
        }
        Ok(found)
    }

    /// Whether the table's columns now differ from those its cached applier stages: a type
    /// changed, or a column was renamed or dropped, by someone else while the pod ran. False
    /// when nothing is cached (the next attempt reads the catalog anyway).
    pub(super) async fn staged_shape_is_stale(
        &self,
        tx: &Transaction<'_>,
        dest: &Dest,
    ) -> Result<bool, SinkError> {
        let Some(mirror) = self.mirrors.get(&dest.name) else {
            return Ok(false);
        };
        let Some(applier) = &mirror.applier else {
            return Ok(false);
        };
        let now = StagePlan::read(tx, self.name, mirror).await?;
        Ok(!now.same_shape(&applier.plan))
    }

    /// The table's applier, built on first use (and after its columns changed).
    async fn applier(
        &mut self,
        tx: &Transaction<'_>,
        dest: &Dest,
    ) -> Result<Arc<Applier>, SinkError> {
        let mirror = self.mirrors.get(&dest.name).expect("ensured before");
        if let Some(applier) = &mirror.applier {
            return Ok(applier.clone());
        }
        let plan = StagePlan::read(tx, self.name, mirror).await?;
        let merge = match &mirror.mapped {
            None => merge_sql::mirror_merge_sql(mirror, &plan, &self.schema, &dest.name),
            Some(mapped) => merge_sql::mapped_merge_sql(
                mirror,
                &plan,
                &self.schema,
                &dest.name,
                mapped.filter.as_deref(),
            ),
        }
        .map_err(|reason| SinkError::Encode {
            table: dest.table.to_string(),
            reason: format!("cannot apply to {}: {reason}", mirror.qualified),
        })?;
        let rewound =
            match &mirror.mapped {
                None => Some(merge_sql::rewound_sql(mirror, &plan).map_err(|reason| {
                    SinkError::Encode {
                        table: dest.table.to_string(),
                        reason: format!("cannot apply to {}: {reason}", mirror.qualified),
                    }
                })?),
                Some(_) => None,
            };
        let updated = plan
            .columns
            .iter()
            .map(|c| mirror.has_column(c.name.name()) && !mirror.key.contains(&c.name))
            .collect();
        let applier = Arc::new(Applier {
            plan,
            merge,
            rewound,
            updated,
        });
        self.mirrors
            .get_mut(&dest.name)
            .expect("ensured before")
            .applier = Some(applier.clone());
        Ok(applier)
    }
}

/// Where each of a row's columns goes in the staging table, in the row's own column order.
/// Consecutive rows of a table nearly always list the same columns in the same order, so the
/// layout is confirmed (one string comparison per column) instead of looked up per value.
#[derive(Default)]
struct RowLayout {
    names: Vec<String>,
    /// 0-based staging index of each row column; None for a column the table lacks.
    positions: Vec<Option<usize>>,
}

impl RowLayout {
    fn fit(&mut self, plan: &StagePlan, row: &Map<String, Value>) {
        if self.names.len() == row.len() && row.keys().zip(&self.names).all(|(a, b)| a == b) {
            return;
        }
        self.names = row.keys().cloned().collect();
        self.positions = self.names.iter().map(|n| plan.index_of(n)).collect();
    }
}

/// One change as a line of COPY text in the staging table's column order: `_cdc_op`,
/// `_cdc_absent`, the position, the source time in ms, then the table's columns (NULL where
/// the row lacks one). `slots` is scratch space, one per staged column.
fn staged_line<'r>(
    out: &mut Vec<u8>,
    applier: &Applier,
    layout: &mut RowLayout,
    slots: &mut Vec<Option<&'r Value>>,
    e: &ChangeEvent,
    row: &'r Map<String, Value>,
) {
    use std::io::Write;
    let plan = &applier.plan;
    layout.fit(plan, row);
    slots.clear();
    slots.resize(plan.columns.len(), None);
    for (v, position) in row.values().zip(&layout.positions) {
        if let Some(i) = position {
            slots[*i] = Some(v);
        }
    }
    let op = if e.op == Op::Delete { "d" } else { e.op.code() };
    out.extend_from_slice(op.as_bytes());
    // Positions of the updatable columns the row lacks: the MERGE keeps their stored value.
    out.extend_from_slice(b"\t{");
    let mut first = true;
    for (i, slot) in slots.iter().enumerate() {
        if slot.is_none() && applier.updated[i] {
            if !first {
                out.push(b',');
            }
            first = false;
            write!(out, "{}", i + 1).expect("writing to a Vec");
        }
    }
    out.extend_from_slice(b"}");
    write!(
        out,
        "\t{}\t{}\t{}\t{}\t",
        e.position.commit_lsn, e.position.change_lsn, e.coords.partition, e.coords.offset
    )
    .expect("writing to a Vec");
    // The same range the binary COPY accepted: beyond it, no source time.
    match crate::db::pg_timestamp(e.source.ts_ms).and(e.source.ts_ms) {
        Some(ms) => write!(out, "{ms}").expect("writing to a Vec"),
        None => out.extend_from_slice(NULL),
    }
    for (slot, c) in slots.iter().zip(&plan.columns) {
        out.push(b'\t');
        match slot {
            Some(v) => push_value(out, v, c.kind.text()),
            None => out.extend_from_slice(NULL),
        }
    }
    out.push(b'\n');
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Ident, KafkaCoordinates};
    use crate::envelope::{Decoded, Decoder};
    use crate::sink::state::staging::{ColumnKind, StageColumn};

    fn change(offset: i64, after: &str) -> ChangeEvent {
        let value = format!(
            r#"{{"before":null,"after":{after},"source":{{"name":"p","ts_ms":1700000000123,"db":"d","sequence":"[\"10\",\"12\"]","schema":"public","table":"t","txId":1,"lsn":12}},"op":"u","ts_ms":2}}"#
        );
        let coords = KafkaCoordinates {
            topic: "p.public.t".into(),
            partition: 3,
            offset,
            timestamp_ms: Some(1),
        };
        match Decoder::new().decode(coords, Some(br#"{"id":1}"#), Some(value.as_bytes())) {
            Decoded::Change(e) => Arc::unwrap_or_clone(e),
            other => panic!("expected a change, got {other:?}"),
        }
    }

    fn applier(columns: &[(&str, ColumnKind)]) -> Applier {
        let plan = StagePlan::new(
            columns
                .iter()
                .map(|(name, kind)| StageColumn {
                    name: Ident::new(*name).unwrap(),
                    sql_type: "text".into(),
                    kind: *kind,
                })
                .collect(),
        );
        // Every column but the key (`id`) is updated by the MERGE.
        let updated = columns.iter().map(|(name, _)| *name != "id").collect();
        Applier {
            plan,
            merge: String::new(),
            rewound: None,
            updated,
        }
    }

    /// The staged lines of `changes`, as COPY text.
    fn lines(applier: &Applier, changes: &[ChangeEvent]) -> Vec<String> {
        let mut out = Vec::new();
        let mut layout = RowLayout::default();
        let mut slots = Vec::new();
        let rows: Vec<_> = changes.iter().map(|e| e.after.clone().unwrap()).collect();
        for (e, row) in changes.iter().zip(&rows) {
            staged_line(&mut out, applier, &mut layout, &mut slots, e, row);
        }
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn each_value_lands_in_its_column_when_rows_change_columns_or_order() {
        let a = applier(&[
            ("id", ColumnKind::Scalar),
            ("name", ColumnKind::Scalar),
            ("doc", ColumnKind::Json),
            ("tags", ColumnKind::ViaJsonb),
        ]);
        let changes = [
            change(0, r#"{"id":1,"name":"a\tb","doc":{"k":1},"tags":["x"]}"#),
            // Another order: the layout must follow it.
            change(1, r#"{"tags":null,"doc":"s","name":"c","id":2}"#),
            // Fewer columns (a TOAST placeholder, or an older schema): absent, not NULL.
            change(2, r#"{"id":3,"doc":null}"#),
            // A column the table lacks is left out; a number for a text column is written
            // out as numeric prints it.
            change(3, r#"{"id":4,"extra":5,"name":1.5e2,"doc":1e3,"tags":[]}"#),
        ];
        // commit lsn (the sequence's last commit), change lsn, partition; then the offset.
        let pos = "\t10\t12\t3\t";
        assert_eq!(
            lines(&a, &changes),
            [
                format!("u\t{{}}{pos}0\t1700000000123\t1\ta\\tb\t{{\"k\":1}}\t[\"x\"]"),
                format!("u\t{{}}{pos}1\t1700000000123\t2\tc\t\"s\"\t\\N"),
                format!("u\t{{2,4}}{pos}2\t1700000000123\t3\t\\N\t\\N\t\\N"),
                format!("u\t{{}}{pos}3\t1700000000123\t4\t150\t1e+3\t[]"),
            ]
        );
    }
}
