//! Compaction records: how the manifest says that files were replaced.
//!
//! Commits (`_manifest/…`) are never rewritten: they stay the checkpoint and say which offsets
//! the lake accounted for. `cdc-lake lake compact` merges a run of a table's small files (one
//! date, one topic-partition, consecutive in offset order) into one file and records the
//! replacement in `_compactions/<topic>/<partition>/<sequence>.json`, written create-only after
//! the new files are uploaded. A partition's current files are its commits' files with every
//! record applied in sequence order ([`read_partition`]); cdc-lake's readers (replay, prune-raw)
//! read only those, so a crash before a record lands changes nothing they see.

use std::collections::BTreeMap;

use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use super::manifest::{Commit, FileEntry, Layout};
use super::store::{read_commits, read_json, store_err};
use crate::domain::TopicPartition;
use crate::sink::SinkError;
use futures::TryStreamExt;

/// One compacted file and the files it replaces, in offset order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replacement {
    pub file: FileEntry,
    pub replaces: Vec<FileEntry>,
}

/// One compaction of one topic-partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compaction {
    pub topic: String,
    pub partition: i32,
    /// 1, 2, …: records apply in this order.
    pub sequence: u64,
    pub replacements: Vec<Replacement>,
    pub committed_at: String,
}

/// The objects of a compaction being uploaded, so that the next run can delete them when the
/// record never landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionPending {
    pub sequence: u64,
    pub paths: Vec<String>,
}

/// A partition's manifest with its compactions applied.
#[derive(Debug, Default)]
pub struct PartitionFiles {
    pub commits: Vec<Commit>,
    pub compactions: Vec<Compaction>,
    /// The files that hold the partition's rows now, by first offset.
    pub files: Vec<FileEntry>,
}

/// What a listing of a partition's compaction directory holds.
#[derive(Debug, Default)]
pub struct CompactionObjects {
    pub records: Vec<u64>,
    pub pending: Vec<u64>,
    pub vacuumed: Vec<u64>,
}

pub async fn list_compactions(
    store: &dyn ObjectStore,
    layout: &Layout,
    tp: &TopicPartition,
) -> Result<CompactionObjects, SinkError> {
    let dir = layout.compactions_dir(tp);
    let names: Vec<String> = store
        .list(Some(&dir))
        .map_ok(|m| m.location.filename().unwrap_or_default().to_string())
        .try_collect()
        .await
        .map_err(store_err(&dir))?;
    let mut out = CompactionObjects::default();
    for name in names {
        let (digits, kind) = name.split_once('.').unwrap_or((&name, ""));
        let Ok(sequence) = digits.parse::<u64>() else {
            continue;
        };
        match kind {
            "json" => out.records.push(sequence),
            "pending.json" => out.pending.push(sequence),
            "vacuumed" => out.vacuumed.push(sequence),
            _ => {}
        }
    }
    out.records.sort_unstable();
    out.pending.sort_unstable();
    out.vacuumed.sort_unstable();
    Ok(out)
}

/// A partition's commits, its compaction records, and the files current after them.
pub async fn read_partition(
    store: &dyn ObjectStore,
    layout: &Layout,
    tp: &TopicPartition,
) -> Result<PartitionFiles, SinkError> {
    let commits = read_commits(store, layout, tp).await?;
    let mut compactions = Vec::new();
    for sequence in list_compactions(store, layout, tp).await?.records {
        compactions.push(read_json::<Compaction>(store, &layout.compaction(tp, sequence)).await?);
    }
    let files = current_files(&commits, &compactions).map_err(|reason| SinkError::Manifest {
        path: layout.compactions_dir(tp).to_string(),
        reason,
    })?;
    Ok(PartitionFiles {
        commits,
        compactions,
        files,
    })
}

/// The commits' files with the compactions applied in order. A record that replaces a file
/// not current at its turn means the manifest was changed by hand or by a second compactor
/// at once: an error, never a guess.
pub fn current_files(
    commits: &[Commit],
    compactions: &[Compaction],
) -> Result<Vec<FileEntry>, String> {
    let mut files: BTreeMap<String, FileEntry> = commits
        .iter()
        .flat_map(|c| &c.files)
        .map(|f| (f.path.clone(), f.clone()))
        .collect();
    for c in compactions {
        for r in &c.replacements {
            for old in &r.replaces {
                if files.remove(&old.path).is_none() {
                    return Err(format!(
                        "compaction {} replaces {}, which is not a current file",
                        c.sequence, old.path
                    ));
                }
            }
            files.insert(r.file.path.clone(), r.file.clone());
        }
    }
    let mut out: Vec<FileEntry> = files.into_values().collect();
    out.sort_by(|a, b| (a.min_offset, &a.path).cmp(&(b.min_offset, &b.path)));
    Ok(out)
}

/// The partition's offset ranges with the current files that hold them: each range is one
/// commit, or consecutive commits joined where a compacted file spans them, so that reading
/// a range's files and sorting by offset gives the partition's changes in order.
pub fn ranges_with_files(commits: &[Commit], files: &[FileEntry]) -> Vec<Commit> {
    if commits.is_empty() {
        return Vec::new();
    }
    let index_of = |offset: i64| {
        commits
            .partition_point(|c| c.first_offset <= offset)
            .saturating_sub(1)
    };
    // The last commit each commit's range must be joined up to.
    let mut reach: Vec<usize> = (0..commits.len()).collect();
    for f in files {
        let (a, b) = (index_of(f.min_offset), index_of(f.max_offset));
        reach[a] = reach[a].max(b);
    }
    let mut files_at: Vec<Vec<FileEntry>> = vec![Vec::new(); commits.len()];
    for f in files {
        files_at[index_of(f.min_offset)].push(f.clone());
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < commits.len() {
        let mut end = reach[i];
        let mut j = i;
        while j <= end {
            end = end.max(reach[j]);
            j += 1;
        }
        let joined: Vec<FileEntry> = files_at[i..=end].iter().flatten().cloned().collect();
        out.push(Commit {
            topic: commits[i].topic.clone(),
            partition: commits[i].partition,
            first_offset: commits[i].first_offset,
            next_offset: commits[end].next_offset,
            files: joined,
            committed_at: commits[end].committed_at.clone(),
        });
        i = end + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, offsets: (i64, i64)) -> FileEntry {
        FileEntry {
            path: path.into(),
            table: "public.orders".into(),
            date: "2026-12-01".into(),
            rows: (offsets.1 - offsets.0 + 1) as u64,
            bytes: 100,
            min_offset: offsets.0,
            max_offset: offsets.1,
        }
    }

    fn commit(first: i64, next: i64, files: Vec<FileEntry>) -> Commit {
        Commit {
            topic: "t".into(),
            partition: 0,
            first_offset: first,
            next_offset: next,
            files,
            committed_at: String::new(),
        }
    }

    fn commits() -> Vec<Commit> {
        vec![
            commit(0, 10, vec![file("a0", (0, 9))]),
            commit(10, 20, vec![file("a10", (10, 14)), file("b10", (15, 19))]),
            commit(20, 30, vec![file("a20", (20, 29))]),
            commit(30, 40, vec![file("b30", (30, 39))]),
        ]
    }

    fn compaction(sequence: u64, new: FileEntry, old: Vec<FileEntry>) -> Compaction {
        Compaction {
            topic: "t".into(),
            partition: 0,
            sequence,
            replacements: vec![Replacement {
                file: new,
                replaces: old,
            }],
            committed_at: String::new(),
        }
    }

    fn paths(files: &[FileEntry]) -> Vec<&str> {
        files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn compactions_replace_files_in_sequence_order() {
        let commits = commits();
        let first = compaction(
            1,
            file("a0-14", (0, 14)),
            vec![file("a0", (0, 9)), file("a10", (10, 14))],
        );
        let second = compaction(
            2,
            file("a0-29", (0, 29)),
            vec![file("a0-14", (0, 14)), file("a20", (20, 29))],
        );
        let files = current_files(&commits, &[first.clone(), second.clone()]).unwrap();
        assert_eq!(paths(&files), ["a0-29", "b10", "b30"]);
        // Out of order, the second record names a file that is not there yet.
        let err = current_files(&commits, &[second, first]).unwrap_err();
        assert!(err.contains("a0-14"), "{err}");
    }

    #[test]
    fn a_compacted_file_joins_the_ranges_it_spans() {
        let commits = commits();
        let files = current_files(
            &commits,
            &[compaction(
                1,
                file("a0-29", (0, 29)),
                vec![
                    file("a0", (0, 9)),
                    file("a10", (10, 14)),
                    file("a20", (20, 29)),
                ],
            )],
        )
        .unwrap();
        let ranges = ranges_with_files(&commits, &files);
        let shape: Vec<(i64, i64, Vec<&str>)> = ranges
            .iter()
            .map(|c| (c.first_offset, c.next_offset, paths(&c.files)))
            .collect();
        assert_eq!(
            shape,
            [(0, 30, vec!["a0-29", "b10"]), (30, 40, vec!["b30"])],
            "offsets 0..30 are read together, so b10's rows sort between a0-29's"
        );
        // Without compactions every commit is its own range.
        let plain = ranges_with_files(&commits, &current_files(&commits, &[]).unwrap());
        assert_eq!(plain, commits);
    }
}
