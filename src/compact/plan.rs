//! Which files a compaction merges: runs of one table's small files of one date and one
//! topic-partition, consecutive in offset order, up to the target size.

use std::collections::BTreeMap;

use crate::sink::lake::manifest::{FileEntry, Layout};

/// What may be compacted.
#[derive(Debug, Clone)]
pub struct Eligibility {
    /// Only this source table (as the raw log names it: `public.orders`).
    pub table: Option<String>,
    /// Only dates before this one (`YYYY-MM-DD`, exclusive).
    pub before: Option<String>,
    pub target_size: u64,
}

/// Files to merge into one (or a few, where the schema changes inside the run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub table_dir: String,
    pub date: String,
    pub files: Vec<FileEntry>,
}

/// The runs among a partition's current files. `published(table_dir, file)` says whether
/// every reader of the table has the file already (its Delta log recorded it): a file the
/// pod may still republish is never replaced.
pub fn plan_runs(
    files: &[FileEntry],
    layout: &Layout,
    eligibility: &Eligibility,
    mut published: impl FnMut(&str, &FileEntry) -> bool,
) -> Result<Vec<Run>, String> {
    let mut groups: BTreeMap<(String, String), Vec<&FileEntry>> = BTreeMap::new();
    for f in files {
        let (dir, _) = layout
            .table_part(&f.path)
            .ok_or_else(|| format!("{} is outside cdc_events/<table>/date=<date>/", f.path))?;
        groups.entry((dir, f.date.clone())).or_default().push(f);
    }
    let mut runs = Vec::new();
    for ((table_dir, date), mut group) in groups {
        group.sort_by_key(|f| f.min_offset);
        let mut run: Vec<FileEntry> = Vec::new();
        let mut run_bytes = 0u64;
        let mut close = |run: &mut Vec<FileEntry>, run_bytes: &mut u64| {
            if run.len() >= 2 {
                runs.push(Run {
                    table_dir: table_dir.clone(),
                    date: date.clone(),
                    files: std::mem::take(run),
                });
            }
            run.clear();
            *run_bytes = 0;
        };
        for f in group {
            let eligible = eligibility.table.as_ref().is_none_or(|t| *t == f.table)
                && eligibility.before.as_ref().is_none_or(|b| f.date < *b)
                && f.bytes < eligibility.target_size
                && published(&table_dir, f);
            if !eligible {
                // Runs never skip a file: a compacted file holds consecutive offsets only.
                close(&mut run, &mut run_bytes);
                continue;
            }
            if !run.is_empty() && run_bytes + f.bytes > eligibility.target_size {
                close(&mut run, &mut run_bytes);
            }
            run_bytes += f.bytes;
            run.push(f.clone());
        }
        close(&mut run, &mut run_bytes);
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(table: &str, date: &str, first: i64, bytes: u64) -> FileEntry {
        FileEntry {
            path: format!("cdc_events/table={table}/date={date}/t+0+{first}.parquet"),
            table: table.into(),
            date: date.into(),
            rows: 10,
            bytes,
            min_offset: first,
            max_offset: first + 9,
        }
    }

    fn firsts(run: &Run) -> Vec<i64> {
        run.files.iter().map(|f| f.min_offset).collect()
    }

    fn eligibility(target_size: u64) -> Eligibility {
        Eligibility {
            table: None,
            before: None,
            target_size,
        }
    }

    #[test]
    fn runs_are_consecutive_small_files_of_one_table_and_date_up_to_the_target() {
        let files = vec![
            file("a", "2026-11-30", 0, 40),
            file("b", "2026-11-30", 10, 40),
            file("a", "2026-11-30", 20, 40),
            file("a", "2026-11-30", 30, 40),
            file("a", "2026-12-01", 40, 40),
            file("a", "2026-11-30", 50, 40),
        ];
        let runs = plan_runs(&files, &Layout::new(""), &eligibility(100), |_, _| true).unwrap();
        let shape: Vec<(&str, &str, Vec<i64>)> = runs
            .iter()
            .map(|r| (r.table_dir.as_str(), r.date.as_str(), firsts(r)))
            .collect();
        // Table a, 2026-11-30: 0, 20 (80 bytes), then 30 and 50 (another 80): the target caps
        // each run. b and 2026-12-01 have one file each: nothing to merge.
        assert_eq!(
            shape,
            [
                ("table=a", "2026-11-30", vec![0, 20]),
                ("table=a", "2026-11-30", vec![30, 50]),
            ]
        );
    }

    #[test]
    fn an_ineligible_file_splits_a_run_instead_of_being_skipped() {
        let files: Vec<FileEntry> = (0..5)
            .map(|i| file("a", "2026-11-30", i * 10, if i == 2 { 500 } else { 10 }))
            .collect();
        let runs = plan_runs(&files, &Layout::new(""), &eligibility(100), |_, _| true).unwrap();
        let shape: Vec<Vec<i64>> = runs.iter().map(firsts).collect();
        assert_eq!(
            shape,
            [vec![0, 10], vec![30, 40]],
            "the big file at 20 stays"
        );

        // Not yet in the Delta log: offsets 30 and up are left alone.
        let runs = plan_runs(&files, &Layout::new(""), &eligibility(100), |_, f| {
            f.max_offset < 30
        })
        .unwrap();
        assert_eq!(runs.iter().map(firsts).collect::<Vec<_>>(), [vec![0, 10]]);
    }

    #[test]
    fn table_and_date_filters_limit_the_runs() {
        let files = vec![
            file("a", "2026-11-30", 0, 10),
            file("a", "2026-11-30", 10, 10),
            file("a", "2026-12-01", 20, 10),
            file("a", "2026-12-01", 30, 10),
            file("b", "2026-11-30", 40, 10),
            file("b", "2026-11-30", 50, 10),
        ];
        let only = |table: Option<&str>, before: Option<&str>| {
            let e = Eligibility {
                table: table.map(str::to_string),
                before: before.map(str::to_string),
                target_size: 1000,
            };
            plan_runs(&files, &Layout::new(""), &e, |_, _| true)
                .unwrap()
                .iter()
                .map(firsts)
                .collect::<Vec<_>>()
        };
        assert_eq!(only(None, None).len(), 3);
        assert_eq!(only(Some("a"), Some("2026-12-01")), [vec![0, 10]]);
        assert_eq!(only(Some("b"), None), [vec![40, 50]]);
    }
}
