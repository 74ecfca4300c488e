//! The MERGE statements that apply a staged batch to a mirror or a mapped table, with the
//! ordering guard and the truncate watermark. Pure text builders, unit-tested here.

use super::Mirror;
use crate::config::DeleteMode;
use crate::domain::Ident;
use crate::sink::mapping::{DELETED_COLUMN, POSITION_COLUMN};

/// A string as an SQL literal (for identifiers compared as values in generated SQL).
pub(super) fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The part both MERGEs share: the target, the newest staged change per key (with the row as
/// the table's columns, `extra` select items, and the table's truncate watermark), the key join.
///
/// The source's columns stay inside the composite `__cdc_r` and the staging columns inside
/// `__cdc_st`, so no source column name (`w_lsn`, `_cdc_op`, ...) can collide with a name the
/// statement uses itself.
pub(super) fn merge_using(m: &Mirror, schema: &str, table: &str, extra: &str) -> String {
    let on: Vec<String> = m.key.iter().map(|k| format!("m.{k} = {ROW}.{k}")).collect();
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
pub(super) const STAGED: &str = "(s.__cdc_st)";
/// The staged row as the target table's columns in a MERGE.
pub(super) const ROW: &str = "(s.__cdc_r)";

/// Rows older than the table's last truncate stay gone.
pub(super) const NEWER_THAN_TRUNCATE: &str = "(s.__cdc_w_commit_lsn IS NULL OR ((s.__cdc_st)._cdc_commit_lsn, (s.__cdc_st)._cdc_lsn) > (s.__cdc_w_commit_lsn, s.__cdc_w_lsn))";

/// Builds the one statement that applies a staged batch to a mirror.
/// `schema` and `table` (unquoted) key the mirror's truncate watermark.
pub(super) fn mirror_merge_sql(m: &Mirror, schema: &str, table: &str) -> String {
    let guard = format!("(m.cdc_commit_lsn, m.cdc_lsn, m.cdc_kafka_offset) < ({STAGED}._cdc_commit_lsn, {STAGED}._cdc_lsn, {STAGED}._cdc_offset)");
    let meta_set = format!(
        "cdc_operation = {STAGED}._cdc_op, cdc_commit_lsn = {STAGED}._cdc_commit_lsn, cdc_lsn = {STAGED}._cdc_lsn, \
        cdc_source_ts = {STAGED}._cdc_source_ts, cdc_kafka_partition = {STAGED}._cdc_partition, \
        cdc_kafka_offset = {STAGED}._cdc_offset, cdc_synced_at = clock_timestamp()"
    );
    let set_clause = set_present_columns(m);
    let cols: Vec<&str> = m.columns.iter().map(Ident::quoted).collect();
    let vals: Vec<String> = m.columns.iter().map(|c| format!("{ROW}.{c}")).collect();
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
pub(super) fn set_present_columns(m: &Mirror) -> String {
    let mut out = String::new();
    for c in m.columns.iter().filter(|c| !m.key.contains(c)) {
        out.push_str(&format!(
            "{c} = CASE WHEN {STAGED}._cdc_row ? {} THEN {ROW}.{c} ELSE m.{c} END, ",
            sql_literal(c.name())
        ));
    }
    out
}

/// The MERGE of a mapped table: the mirrors' statement with the row filter, the mapping's
/// delete policy, and the ordering guard in `__cdc_position`.
pub(super) fn mapped_merge_sql(
    m: &Mirror,
    schema: &str,
    table: &str,
    filter: Option<&str>,
) -> String {
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
    let cols: Vec<&str> = m.columns.iter().map(Ident::quoted).collect();
    let vals: Vec<String> = m.columns.iter().map(|c| format!("{ROW}.{c}")).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(columns: &[&str], key: &[&str], delete_mode: DeleteMode, mapped: bool) -> Mirror {
        let idents = |names: &[&str]| names.iter().map(|n| Ident::new(*n).unwrap()).collect();
        Mirror {
            qualified: "\"cdc_processed\".\"t\"".into(),
            columns: idents(columns),
            key: idents(key),
            delete_mode,
            mapped: mapped.then_some(super::super::MappedTable { filter: None }),
            merge_sql: None,
            numeric: Default::default(),
            coercions: None,
        }
    }

    #[test]
    fn mirror_merge_joins_on_the_quoted_key_and_updates_only_other_columns() {
        let m = mirror(
            &["id", "we\"ird", "Name"],
            &["id"],
            DeleteMode::Delete,
            false,
        );
        let sql = mirror_merge_sql(&m, "cdc_processed", "t");
        assert!(sql.contains("ON m.\"id\" = (s.__cdc_r).\"id\""), "{sql}");
        assert!(sql.contains("\"we\"\"ird\" = CASE WHEN (s.__cdc_st)._cdc_row ? 'we\"ird'"));
        assert!(sql.contains("\"Name\" = CASE"));
        assert!(
            !sql.contains("\"id\" = CASE"),
            "the key is never updated: {sql}"
        );
        assert!(sql.contains("INSERT (\"id\", \"we\"\"ird\", \"Name\", cdc_operation"));
        assert!(sql.contains("THEN DELETE"));
        assert!(sql.contains("WHEN NOT MATCHED AND NOT (s.__cdc_st)._cdc_op = 'd'"));
    }

    #[test]
    fn every_write_is_guarded_by_the_source_position_and_the_truncate_watermark() {
        for mode in [DeleteMode::Delete, DeleteMode::Soft, DeleteMode::Ignore] {
            let sql = mirror_merge_sql(&mirror(&["id", "v"], &["id"], mode, false), "s", "t");
            let guard = "(m.cdc_commit_lsn, m.cdc_lsn, m.cdc_kafka_offset) < ((s.__cdc_st)._cdc_commit_lsn, (s.__cdc_st)._cdc_lsn, (s.__cdc_st)._cdc_offset)";
            assert_eq!(sql.matches(guard).count(), 2, "{mode:?}: {sql}");
            assert!(sql.contains(NEWER_THAN_TRUNCATE), "{mode:?}");
            // The newest staged change per key wins, in source order.
            assert!(sql.contains("ORDER BY st._cdc_key, st._cdc_commit_lsn DESC, st._cdc_lsn DESC, st._cdc_offset DESC"));
        }
    }

    #[test]
    fn soft_deletes_keep_the_row_and_insert_deleted_rows() {
        let sql = mirror_merge_sql(&mirror(&["id"], &["id"], DeleteMode::Soft, false), "s", "t");
        assert!(sql.contains("THEN UPDATE SET cdc_deleted = true"), "{sql}");
        assert!(!sql.contains("THEN DELETE"));
        assert!(
            sql.contains("WHEN NOT MATCHED  AND"),
            "inserts deletes too: {sql}"
        );
    }

    #[test]
    fn watermark_names_are_sql_literals() {
        let sql = mirror_merge_sql(
            &mirror(&["id"], &["id"], DeleteMode::Delete, false),
            "sch'ema",
            "it's",
        );
        assert!(sql.contains("w.target_schema = 'sch''ema' AND w.mirror_table = 'it''s'"));
    }

    #[test]
    fn composite_keys_join_on_every_column() {
        let m = mirror(&["a", "b", "v"], &["a", "b"], DeleteMode::Delete, false);
        let sql = mirror_merge_sql(&m, "s", "t");
        assert!(sql.contains("ON m.\"a\" = (s.__cdc_r).\"a\" AND m.\"b\" = (s.__cdc_r).\"b\""));
        assert_eq!(set_present_columns(&m).matches("CASE").count(), 1);
    }

    #[test]
    fn mapped_merge_filters_rows_and_follows_its_delete_policy() {
        let m = mirror(&["id", "v"], &["id"], DeleteMode::Ignore, true);
        let sql = mapped_merge_sql(&m, "s", "t", Some("v > 1"));
        assert!(sql
            .contains("coalesce((SELECT (v > 1) FROM (SELECT r.*) AS row_), false) AS __cdc_keep"));
        assert!(sql.contains("THEN DO NOTHING"), "{sql}");
        assert!(sql.contains(&format!(
            "coalesce(m.{POSITION_COLUMN}, '{{}}') < s.__cdc_pos"
        )));

        let soft = mirror(&["id", "v"], &["id"], DeleteMode::Soft, true);
        let sql = mapped_merge_sql(&soft, "s", "t", None);
        assert!(sql.contains("true AS __cdc_keep"));
        assert!(sql.contains(&format!("{DELETED_COLUMN} = true")));
        assert!(sql.contains(&format!(
            "INSERT (\"id\", \"v\", {POSITION_COLUMN}, {DELETED_COLUMN})"
        )));

        let hard = mirror(&["id", "v"], &["id"], DeleteMode::Delete, true);
        assert!(mapped_merge_sql(&hard, "s", "t", None).contains("THEN DELETE"));
    }
}
