//! The MERGE statements that apply a staged batch to a mirror or a mapped table, with the
//! ordering guard and the truncate watermark. Pure text builders, unit-tested here.

use super::staging::{ColumnKind, StagePlan};
use super::Mirror;
use crate::config::DeleteMode;
use crate::domain::Ident;
use crate::sink::mapping::{DELETED_COLUMN, POSITION_COLUMN};

/// A string as an SQL literal (for identifiers compared as values in generated SQL).
pub(super) fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The staged column positions of `columns`, or the column the staging table lacks.
fn positions(plan: &StagePlan, columns: &[Ident]) -> Result<Vec<usize>, String> {
    columns
        .iter()
        .map(|c| {
            plan.index_of(c.name())
                .map(|i| i + 1)
                .ok_or_else(|| format!("column {c} is not in the table"))
        })
        .collect()
}

/// The value of staged column `i` inside the USING select (over the staging row `st`): arrays
/// and composites are converted there from their jsonb, the rest are already typed.
fn select_value(m: &Mirror, plan: &StagePlan, i: usize) -> String {
    let c = &plan.columns[i - 1];
    match c.kind {
        ColumnKind::ViaJsonb => format!(
            "(jsonb_populate_record(NULL::{t}, jsonb_build_object({lit}, st.c{i}))).{c}",
            t = m.qualified,
            lit = sql_literal(c.name.name()),
            c = c.name,
        ),
        ColumnKind::Scalar | ColumnKind::Json => format!("st.c{i}"),
    }
}

/// The value of staged column `i` in the MERGE's clauses (over the USING row `s`).
fn value(plan: &StagePlan, i: usize) -> String {
    match plan.columns[i - 1].kind {
        ColumnKind::ViaJsonb => format!("s.v{i}"),
        ColumnKind::Scalar | ColumnKind::Json => format!("s.c{i}"),
    }
}

/// The join of a staged row `s` to its mirror row `m` on the key, whose staged columns are at
/// `key` (from [`positions`]).
fn key_join(m: &Mirror, plan: &StagePlan, key: &[usize]) -> String {
    m.key
        .iter()
        .zip(key)
        .map(|(k, &i)| format!("m.{k} = {}", value(plan, i)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The part both MERGEs share: the target, the newest staged change per key (the staged
/// columns, converted values, `extra` select items, and the table's truncate watermark), the
/// key join.
fn merge_using(
    m: &Mirror,
    plan: &StagePlan,
    schema: &str,
    table: &str,
    extra: &str,
) -> Result<String, String> {
    let key = positions(plan, &m.key)?;
    let on = key_join(m, plan, &key);
    let distinct: Vec<String> = key.iter().map(|i| format!("st.c{i}")).collect();
    let converted: String = (1..=plan.columns.len())
        .filter(|&i| plan.columns[i - 1].kind == ColumnKind::ViaJsonb)
        .map(|i| format!(", {} AS v{i}", select_value(m, plan, i)))
        .collect();
    Ok(format!(
        "MERGE INTO {t} AS m
         USING (SELECT DISTINCT ON ({distinct}) st.*{converted}, w.commit_lsn AS __cdc_w_commit_lsn, w.lsn AS __cdc_w_lsn{extra}
                  FROM {stage} st
                  LEFT JOIN cdc_lake.truncations w
                         ON w.target_schema = {schema_lit} AND w.mirror_table = {table_lit}
                 ORDER BY {distinct}, st._cdc_commit_lsn DESC, st._cdc_lsn DESC, st._cdc_offset DESC) AS s
            ON {on}",
        t = m.qualified,
        stage = plan.table,
        distinct = distinct.join(", "),
        schema_lit = sql_literal(schema),
        table_lit = sql_literal(table),
    ))
}

/// The change's source time: staged as epoch milliseconds, whole seconds and the rest apart
/// so no digit goes through floating point.
const SOURCE_TS: &str =
    "(to_timestamp(s._cdc_source_ts_ms / 1000) + (s._cdc_source_ts_ms % 1000) * interval '1 millisecond')";

/// Rows older than the table's last truncate stay gone.
pub(super) const NEWER_THAN_TRUNCATE: &str = "(s.__cdc_w_commit_lsn IS NULL OR (s._cdc_commit_lsn, s._cdc_lsn) > (s.__cdc_w_commit_lsn, s.__cdc_w_lsn))";

/// How much later than the mirror's row a change behind it must have been committed to count
/// as from a source that started over. Within one WAL, commit times follow commit positions
/// except for transactions committing at the same moment, well inside this.
const REWIND_SLACK: &str = "interval '1 second'";

/// After a mirror's MERGE: the staged changes it held back although they are newer. Each is
/// behind its key's row in source position yet committed more than [`REWIND_SLACK`] later,
/// which one WAL cannot produce: the source database was created again or restored to an
/// earlier point, and its positions started over below the mirror's. Returns partition,
/// offset, and the change's and the row's commit positions.
pub(super) fn rewound_sql(m: &Mirror, plan: &StagePlan) -> Result<String, String> {
    let key = positions(plan, &m.key)?;
    let on = key_join(m, plan, &key);
    let converted: String = key
        .iter()
        .filter(|&&i| plan.columns[i - 1].kind == ColumnKind::ViaJsonb)
        .map(|&i| format!(", {} AS v{i}", select_value(m, plan, i)))
        .collect();
    Ok(format!(
        "SELECT s._cdc_partition, s._cdc_offset, s._cdc_commit_lsn, m.cdc_commit_lsn
           FROM (SELECT st.*{converted} FROM {stage} st) s
           JOIN {t} m ON {on}
          WHERE (m.cdc_commit_lsn, m.cdc_lsn) > (s._cdc_commit_lsn, s._cdc_lsn)
            AND {SOURCE_TS} > m.cdc_source_ts + {REWIND_SLACK}",
        stage = plan.table,
        t = m.qualified,
    ))
}

/// `(cols) VALUES (values)` lists of an INSERT of the table's columns.
fn insert_lists(m: &Mirror, plan: &StagePlan) -> Result<(String, String), String> {
    let cols: Vec<&str> = m.columns.iter().map(Ident::quoted).collect();
    let vals: Vec<String> = positions(plan, &m.columns)?
        .into_iter()
        .map(|i| value(plan, i))
        .collect();
    Ok((cols.join(", "), vals.join(", ")))
}

/// Builds the one statement that applies a staged batch to a mirror.
/// `schema` and `table` (unquoted) key the mirror's truncate watermark.
pub(super) fn mirror_merge_sql(
    m: &Mirror,
    plan: &StagePlan,
    schema: &str,
    table: &str,
) -> Result<String, String> {
    let guard = "(m.cdc_commit_lsn, m.cdc_lsn, m.cdc_kafka_offset) < (s._cdc_commit_lsn, s._cdc_lsn, s._cdc_offset)";
    let meta_set = format!(
        "cdc_operation = s._cdc_op, cdc_commit_lsn = s._cdc_commit_lsn, cdc_lsn = s._cdc_lsn, \
        cdc_source_ts = {SOURCE_TS}, cdc_kafka_partition = s._cdc_partition, \
        cdc_kafka_offset = s._cdc_offset, cdc_synced_at = clock_timestamp()"
    );
    let set_clause = set_present_columns(m, plan)?;
    let (cols, vals) = insert_lists(m, plan)?;
    let insert = format!(
        "INSERT ({cols}, cdc_operation, cdc_commit_lsn, cdc_lsn, cdc_source_ts, cdc_kafka_partition, cdc_kafka_offset, cdc_deleted, cdc_synced_at) \
         VALUES ({vals}, s._cdc_op, s._cdc_commit_lsn, s._cdc_lsn, {SOURCE_TS}, s._cdc_partition, s._cdc_offset, s._cdc_op = 'd', clock_timestamp())"
    );
    let is_delete = "s._cdc_op = 'd'";
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
    Ok(format!(
        "{using}
          WHEN MATCHED AND {is_delete} AND {guard} THEN {on_delete}
          WHEN MATCHED AND NOT {is_delete} AND {guard} THEN
               UPDATE SET {set_clause}cdc_deleted = false, {meta_set}
          WHEN NOT MATCHED {insert_when} AND {NEWER_THAN_TRUNCATE} THEN {insert}",
        using = merge_using(m, plan, schema, table, "")?,
    ))
}

/// `col = <staged value unless the staged row lacked it, else the stored one>, ` for each
/// non-key column: a column the change lacked was a TOAST placeholder (or, for a mapped
/// delete, a data column the delete does not carry); `_cdc_absent` lists their positions.
pub(super) fn set_present_columns(m: &Mirror, plan: &StagePlan) -> Result<String, String> {
    let mut out = String::new();
    for c in m.columns.iter().filter(|c| !m.key.contains(c)) {
        let i = positions(plan, std::slice::from_ref(c))?[0];
        out.push_str(&format!(
            "{c} = CASE WHEN {i} = ANY (s._cdc_absent) THEN m.{c} ELSE {} END, ",
            value(plan, i)
        ));
    }
    Ok(out)
}

/// The MERGE of a mapped table: the mirrors' statement with the row filter, the mapping's
/// delete policy, and the ordering guard in `__cdc_position`.
pub(super) fn mapped_merge_sql(
    m: &Mirror,
    plan: &StagePlan,
    schema: &str,
    table: &str,
    filter: Option<&str>,
) -> Result<String, String> {
    let set_clause = set_present_columns(m, plan)?;
    let guard = format!("coalesce(m.{POSITION_COLUMN}, '{{}}') < s.__cdc_pos");
    // The filter sees the mapped row's columns by name (the inner FROM shadows the rest).
    let keep = match filter {
        Some(f) => {
            let row: Vec<String> = (1..=plan.columns.len())
                .map(|i| {
                    format!(
                        "{} AS {}",
                        select_value(m, plan, i),
                        plan.columns[i - 1].name
                    )
                })
                .collect();
            format!(
                "coalesce((SELECT ({f}) FROM (SELECT {}) AS row_), false)",
                row.join(", ")
            )
        }
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
    let is_delete = "s._cdc_op = 'd'";
    let (insert_when, deleted_col, deleted_val) = if m.delete_mode == DeleteMode::Soft {
        (
            String::new(),
            format!(", {DELETED_COLUMN}"),
            format!(", {is_delete}"),
        )
    } else {
        (format!("AND NOT {is_delete}"), String::new(), String::new())
    };
    let (cols, vals) = insert_lists(m, plan)?;
    let extra = format!(
        ",
                       ARRAY[st._cdc_commit_lsn, st._cdc_lsn, st._cdc_offset] AS __cdc_pos,
                       {keep} AS __cdc_keep"
    );
    Ok(format!(
        "{using}
          WHEN MATCHED AND ({is_delete} OR NOT s.__cdc_keep) AND {guard} THEN {gone}
          WHEN MATCHED AND {guard} THEN
               UPDATE SET {set_clause}{POSITION_COLUMN} = s.__cdc_pos{undelete}
          WHEN NOT MATCHED {insert_when} AND s.__cdc_keep AND {NEWER_THAN_TRUNCATE}
          THEN INSERT ({cols}, {POSITION_COLUMN}{deleted_col}) VALUES ({vals}, s.__cdc_pos{deleted_val})",
        using = merge_using(m, plan, schema, table, &extra)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::staging::StageColumn;
    use super::*;

    fn mirror(columns: &[&str], key: &[&str], delete_mode: DeleteMode, mapped: bool) -> Mirror {
        let idents = |names: &[&str]| names.iter().map(|n| Ident::new(*n).unwrap()).collect();
        Mirror {
            qualified: "\"cdc_processed\".\"t\"".into(),
            columns: idents(columns),
            key: idents(key),
            delete_mode,
            mapped: mapped.then_some(super::super::MappedTable { filter: None }),
            applier: None,
            numeric: Default::default(),
            coercions: None,
        }
    }

    /// The staging plan of `m`'s columns, all text but `arr` (an array, staged as jsonb).
    fn plan(m: &Mirror) -> StagePlan {
        StagePlan::new(
            m.columns
                .iter()
                .map(|c| StageColumn {
                    name: c.clone(),
                    sql_type: "text".into(),
                    kind: if c.name() == "arr" {
                        ColumnKind::ViaJsonb
                    } else {
                        ColumnKind::Scalar
                    },
                })
                .collect(),
        )
    }

    fn mirror_sql(m: &Mirror, schema: &str, table: &str) -> String {
        mirror_merge_sql(m, &plan(m), schema, table).unwrap()
    }

    #[test]
    fn mirror_merge_joins_on_the_quoted_key_and_updates_only_other_columns() {
        let m = mirror(
            &["id", "we\"ird", "Name"],
            &["id"],
            DeleteMode::Delete,
            false,
        );
        let sql = mirror_sql(&m, "cdc_processed", "t");
        assert!(sql.contains("ON m.\"id\" = s.c1"), "{sql}");
        assert!(sql.contains("DISTINCT ON (st.c1)"), "{sql}");
        assert!(sql.contains(
            "\"we\"\"ird\" = CASE WHEN 2 = ANY (s._cdc_absent) THEN m.\"we\"\"ird\" ELSE s.c2 END"
        ));
        assert!(sql.contains("\"Name\" = CASE"));
        assert!(
            !sql.contains("\"id\" = CASE"),
            "the key is never updated: {sql}"
        );
        assert!(sql.contains("INSERT (\"id\", \"we\"\"ird\", \"Name\", cdc_operation"));
        assert!(sql.contains("VALUES (s.c1, s.c2, s.c3, s._cdc_op"));
        assert!(sql.contains("THEN DELETE"));
        assert!(sql.contains("WHEN NOT MATCHED AND NOT s._cdc_op = 'd'"));
    }

    #[test]
    fn arrays_are_converted_from_their_staged_json_once() {
        let m = mirror(&["id", "arr"], &["id"], DeleteMode::Delete, false);
        let sql = mirror_sql(&m, "s", "t");
        assert!(sql.contains(
            "(jsonb_populate_record(NULL::\"cdc_processed\".\"t\", jsonb_build_object('arr', st.c2))).\"arr\" AS v2"
        ), "{sql}");
        assert!(sql.contains("ELSE s.v2 END"), "{sql}");
        assert!(plan(&m).create.contains("c2 jsonb"), "{}", plan(&m).create);
    }

    #[test]
    fn every_write_is_guarded_by_the_source_position_and_the_truncate_watermark() {
        for mode in [DeleteMode::Delete, DeleteMode::Soft, DeleteMode::Ignore] {
            let sql = mirror_sql(&mirror(&["id", "v"], &["id"], mode, false), "s", "t");
            let guard = "(m.cdc_commit_lsn, m.cdc_lsn, m.cdc_kafka_offset) < (s._cdc_commit_lsn, s._cdc_lsn, s._cdc_offset)";
            assert_eq!(sql.matches(guard).count(), 2, "{mode:?}: {sql}");
            assert!(sql.contains(NEWER_THAN_TRUNCATE), "{mode:?}");
            // The newest staged change per key wins, in source order.
            assert!(sql.contains(
                "ORDER BY st.c1, st._cdc_commit_lsn DESC, st._cdc_lsn DESC, st._cdc_offset DESC"
            ));
        }
    }

    #[test]
    fn soft_deletes_keep_the_row_and_insert_deleted_rows() {
        let sql = mirror_sql(&mirror(&["id"], &["id"], DeleteMode::Soft, false), "s", "t");
        assert!(sql.contains("THEN UPDATE SET cdc_deleted = true"), "{sql}");
        assert!(!sql.contains("THEN DELETE"));
        assert!(
            sql.contains("WHEN NOT MATCHED  AND"),
            "inserts deletes too: {sql}"
        );
    }

    #[test]
    fn watermark_names_are_sql_literals() {
        let sql = mirror_sql(
            &mirror(&["id"], &["id"], DeleteMode::Delete, false),
            "sch'ema",
            "it's",
        );
        assert!(sql.contains("w.target_schema = 'sch''ema' AND w.mirror_table = 'it''s'"));
    }

    #[test]
    fn composite_keys_join_on_every_column() {
        let m = mirror(&["a", "b", "v"], &["a", "b"], DeleteMode::Delete, false);
        let sql = mirror_sql(&m, "s", "t");
        assert!(
            sql.contains("ON m.\"a\" = s.c1 AND m.\"b\" = s.c2"),
            "{sql}"
        );
        assert!(sql.contains("DISTINCT ON (st.c1, st.c2)"));
        assert_eq!(
            set_present_columns(&m, &plan(&m))
                .unwrap()
                .matches("CASE")
                .count(),
            1
        );
    }

    #[test]
    fn a_key_column_the_table_lacks_is_an_error_not_a_statement() {
        let m = mirror(&["v"], &["id"], DeleteMode::Delete, false);
        let err = mirror_merge_sql(&m, &plan(&m), "s", "t").unwrap_err();
        assert!(err.contains("id"), "{err}");
    }

    #[test]
    fn mapped_merge_filters_rows_and_follows_its_delete_policy() {
        let m = mirror(&["id", "v"], &["id"], DeleteMode::Ignore, true);
        let sql = mapped_merge_sql(&m, &plan(&m), "s", "t", Some("v > 1")).unwrap();
        assert!(sql.contains(
            "coalesce((SELECT (v > 1) FROM (SELECT st.c1 AS \"id\", st.c2 AS \"v\") AS row_), false) AS __cdc_keep"
        ), "{sql}");
        assert!(sql.contains("THEN DO NOTHING"), "{sql}");
        assert!(sql.contains(&format!(
            "coalesce(m.{POSITION_COLUMN}, '{{}}') < s.__cdc_pos"
        )));

        let soft = mirror(&["id", "v"], &["id"], DeleteMode::Soft, true);
        let sql = mapped_merge_sql(&soft, &plan(&soft), "s", "t", None).unwrap();
        assert!(sql.contains("true AS __cdc_keep"));
        assert!(sql.contains(&format!("{DELETED_COLUMN} = true")));
        assert!(sql.contains(&format!(
            "INSERT (\"id\", \"v\", {POSITION_COLUMN}, {DELETED_COLUMN})"
        )));

        let hard = mirror(&["id", "v"], &["id"], DeleteMode::Delete, true);
        assert!(mapped_merge_sql(&hard, &plan(&hard), "s", "t", None)
            .unwrap()
            .contains("THEN DELETE"));
    }
}
