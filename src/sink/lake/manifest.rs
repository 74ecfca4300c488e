//! The lake manifest: one immutable JSON object per commit, per topic-partition, written only
//! after every file it lists is uploaded. Readers and the checkpoint trust the manifest, never a
//! directory listing.
//!
//! `<prefix>/_manifest/<topic>/<partition>/<first offset, 20 digits>.json` lists the files
//! covering offsets `[first_offset, next_offset)`. Ranges of one partition are contiguous.
//! `_pending.json` beside them names the objects of the commit being uploaded, so that a
//! restart can delete objects that were uploaded but never committed.

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::config::LakeLayout;
use crate::domain::TableId;
use crate::domain::TopicPartition;
use crate::naming::qualified_name;
use crate::sink::ident::lake_path_segment;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub table: String,
    pub date: String,
    pub rows: u64,
    pub bytes: u64,
    pub min_offset: i64,
    pub max_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub next_offset: i64,
    pub files: Vec<FileEntry>,
    pub committed_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub first_offset: i64,
    pub paths: Vec<String>,
}

/// An object path as the manifest records it (already made of valid segments: `%` escapes stay
/// as they are, where `Path::from` would escape them again).
pub fn stored_path(path: &str) -> Path {
    Path::parse(path).unwrap_or_else(|_| Path::from(path))
}

/// The UTC day of `ms` as [`date_of`] names it (None where it says 1970-01-01 for want of a
/// date), without formatting it.
pub fn day_of(ms: Option<i64>) -> Option<i64> {
    ms.filter(|ms| chrono::DateTime::from_timestamp_millis(*ms).is_some())
        .map(|ms| ms.div_euclid(86_400_000))
}

/// UTC date of epoch milliseconds.
pub fn date_of(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

/// The directory of a source table's files below `cdc_events/`: `table=<schema.table>`, or with
/// the `source` layout `server=<server>/db=<db>/table=<schema.table>`. Every part goes through
/// [`lake_path_segment`] and the table name through [`qualified_name`], so no two source tables
/// share a directory.
pub fn table_dir(layout: LakeLayout, source: (&str, &str), table: &TableId) -> String {
    let (server, db) = source;
    let table = lake_path_segment(&qualified_name(table)).into_owned();
    match layout {
        LakeLayout::Table => format!("table={table}"),
        LakeLayout::Source => format!(
            "server={}/db={}/table={table}",
            lake_path_segment(server),
            lake_path_segment(db)
        ),
    }
}

/// Builds paths from a validated prefix. Table and topic names become path segments through
/// [`lake_path_segment`], so any name lands in a directory of its own.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        Self {
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        }
    }

    /// A data file under `table_dir` ([`table_dir`]).
    pub fn data_file(
        &self,
        table_dir: &str,
        date: &str,
        tp: &TopicPartition,
        first_offset: i64,
    ) -> Path {
        stored_path(&format!(
            "{}cdc_events/{table_dir}/date={date}/{}+{}+{first_offset}.parquet",
            self.prefix,
            lake_path_segment(&tp.topic),
            tp.partition
        ))
    }

    /// A data file's table directory (as [`table_dir`] names it) and its path below it
    /// (`date=<date>/<name>`), from the path the manifest records.
    pub fn table_part(&self, path: &str) -> Option<(String, String)> {
        let below = path
            .strip_prefix(&self.prefix)?
            .strip_prefix("cdc_events/")?;
        let mut parts = below.rsplitn(3, '/');
        let (name, date, dir) = (parts.next()?, parts.next()?, parts.next()?);
        Some((dir.to_string(), format!("{date}/{name}")))
    }

    /// A compacted file under `table_dir`: named by the first and last offset it holds, so it
    /// never shares a name with the files it replaces.
    pub fn compacted_file(
        &self,
        table_dir: &str,
        date: &str,
        tp: &TopicPartition,
        offsets: (i64, i64),
    ) -> Path {
        stored_path(&format!(
            "{}cdc_events/{table_dir}/date={date}/{}+{}+{}-{}.parquet",
            self.prefix,
            lake_path_segment(&tp.topic),
            tp.partition,
            offsets.0,
            offsets.1
        ))
    }

    /// A partition's compaction records (`<sequence, 20 digits>.json`), apart from its commits
    /// so that a reader of commits never mistakes one for the other.
    pub fn compactions_dir(&self, tp: &TopicPartition) -> Path {
        stored_path(&format!(
            "{}_compactions/{}/{}",
            self.prefix,
            lake_path_segment(&tp.topic),
            tp.partition
        ))
    }

    pub fn compaction(&self, tp: &TopicPartition, sequence: u64) -> Path {
        self.compactions_dir(tp)
            .child(format!("{sequence:020}.json"))
    }

    /// The objects a compaction is uploading before its record lands.
    pub fn compaction_pending(&self, tp: &TopicPartition, sequence: u64) -> Path {
        self.compactions_dir(tp)
            .child(format!("{sequence:020}.pending.json"))
    }

    /// Written when a compaction's replaced files are deleted (after the retention).
    pub fn compaction_vacuumed(&self, tp: &TopicPartition, sequence: u64) -> Path {
        self.compactions_dir(tp)
            .child(format!("{sequence:020}.vacuumed"))
    }

    /// The lease of the one compaction running on the lake.
    pub fn compaction_lock(&self) -> Path {
        stored_path(&format!("{}_compactions/_lock.json", self.prefix))
    }

    pub fn manifest_dir(&self, tp: &TopicPartition) -> Path {
        stored_path(&format!(
            "{}_manifest/{}/{}",
            self.prefix,
            lake_path_segment(&tp.topic),
            tp.partition
        ))
    }

    pub fn commit(&self, tp: &TopicPartition, first_offset: i64) -> Path {
        stored_path(&format!(
            "{}_manifest/{}/{}/{first_offset:020}.json",
            self.prefix,
            lake_path_segment(&tp.topic),
            tp.partition
        ))
    }

    pub fn pending(&self, tp: &TopicPartition) -> Path {
        stored_path(&format!(
            "{}_manifest/{}/{}/_pending.json",
            self.prefix,
            lake_path_segment(&tp.topic),
            tp.partition
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_layout() {
        let l = Layout::new("/team/");
        let tp = TopicPartition::new("ecom.public.books", 2);
        assert_eq!(
            l.data_file(
                &table_dir(
                    LakeLayout::Table,
                    ("", ""),
                    &TableId::new("public", "books")
                ),
                "2024-03-02",
                &tp,
                17
            )
            .as_ref(),
            "team/cdc_events/table=public.books/date=2024-03-02/ecom.public.books+2+17.parquet"
        );
        assert_eq!(
            l.table_part(
                "team/cdc_events/server=a/db=b/table=public.books/date=2024-03-02/t+2+17.parquet"
            ),
            Some((
                "server=a/db=b/table=public.books".into(),
                "date=2024-03-02/t+2+17.parquet".into()
            ))
        );
        assert_eq!(
            l.commit(&tp, 17).as_ref(),
            "team/_manifest/ecom.public.books/2/00000000000000000017.json"
        );
        assert_eq!(
            l.compacted_file("table=public.books", "2024-03-02", &tp, (17, 90))
                .as_ref(),
            "team/cdc_events/table=public.books/date=2024-03-02/ecom.public.books+2+17-90.parquet"
        );
        assert_eq!(
            l.compaction(&tp, 3).as_ref(),
            "team/_compactions/ecom.public.books/2/00000000000000000003.json"
        );
        let root = Layout::new("");
        assert_eq!(
            root.pending(&tp).as_ref(),
            "_manifest/ecom.public.books/2/_pending.json"
        );
    }

    #[test]
    fn unsafe_table_names_get_a_directory_of_their_own() {
        let l = Layout::new("");
        let tp = TopicPartition::new("t", 0);
        assert_eq!(
            l.data_file(&dir("public/", "."), "2024-03-02", &tp, 0)
                .as_ref(),
            "cdc_events/table=public%2F.%5C./date=2024-03-02/t+0+0.parquet"
        );
        assert_eq!(
            l.data_file(&dir("", ""), "2024-03-02", &tp, 0).as_ref(),
            "cdc_events/table=%2E/date=2024-03-02/t+0+0.parquet"
        );
        // Schema `a.b` table `c` and schema `a` table `b.c` stay apart.
        assert_ne!(dir("a.b", "c"), dir("a", "b.c"));
    }

    fn dir(schema: &str, table: &str) -> String {
        table_dir(LakeLayout::Table, ("", ""), &TableId::new(schema, table))
    }

    #[test]
    fn the_source_layout_puts_each_source_database_apart() {
        let one = ("ecom", "shop");
        let other = ("ecom2", "shop/2");
        let orders = TableId::new("public", "orders");
        assert_eq!(
            table_dir(LakeLayout::Source, one, &orders),
            "server=ecom/db=shop/table=public.orders"
        );
        assert_eq!(
            table_dir(LakeLayout::Source, other, &orders),
            "server=ecom2/db=shop%2F2/table=public.orders"
        );
    }

    #[test]
    fn commit_names_sort_by_offset() {
        let l = Layout::new("");
        let tp = TopicPartition::new("t", 0);
        let a = l.commit(&tp, 9).to_string();
        let b = l.commit(&tp, 10).to_string();
        assert!(a < b, "zero padding keeps lexicographic order numeric");
    }
}
