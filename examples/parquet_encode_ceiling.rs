//! The Parquet encode ceiling: arrow-rs writing the rows of a lake from memory, with the lake's
//! own writer properties (`encode::writer_properties`), in files of the lake's size. The rows
//! are read once from the lake's files under DIR (a finished bench run), so the ceiling is
//! measured on exactly the rows the pod wrote; `tools/bench` reports the lake sink's throughput
//! as a ratio to it.
//!
//! Usage: cargo run --release --example parquet_encode_ceiling -- DIR [SECONDS]
//! Prints one JSON object: {"rows": …, "files": …, "seconds": …, "rows_per_s": …}.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use cdc_lake::sink::lake::encode::write_parquet;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every data file under `dir`, skipping Delta logs and checkpoints.
fn parquet_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "_delta_log") {
                parquet_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "parquet") {
            out.push(path);
        }
    }
}

/// One file's rows as a single batch, with the file's key-value metadata dropped (it is small
/// and per file; the columns are the work).
fn read_file(path: &Path) -> RecordBatch {
    let file = std::fs::File::open(path).expect("a lake file");
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("a Parquet file")
        .with_batch_size(1 << 20)
        .build()
        .expect("a reader");
    let batches: Vec<RecordBatch> = reader.map(|b| b.expect("a batch")).collect();
    let schema = batches
        .first()
        .map(RecordBatch::schema)
        .expect("a file with rows");
    arrow::compute::concat_batches(&schema, &batches).expect("one batch per file")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        eprintln!("usage: parquet_encode_ceiling DIR [SECONDS]");
        std::process::exit(2);
    };
    let budget = Duration::from_secs_f64(args.get(2).map_or(3.0, |s| s.parse().expect("SECONDS")));
    let mut files = Vec::new();
    parquet_files(Path::new(dir), &mut files);
    files.sort();
    let batches: Vec<RecordBatch> = files.iter().map(|f| read_file(f)).collect();
    let rows_per_pass: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if rows_per_pass == 0 {
        eprintln!("no rows in Parquet files under {dir}");
        std::process::exit(1);
    }
    // Whole passes over the same files until the budget is spent.
    let (mut rows, mut bytes, mut passes) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    while passes == 0 || started.elapsed() < budget {
        for batch in &batches {
            bytes += write_parquet(batch, None).expect("encode").len();
            rows += batch.num_rows();
        }
        passes += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "rows": rows,
            "files": files.len(),
            "passes": passes,
            "bytes": bytes,
            "seconds": seconds,
            "rows_per_s": rows as f64 / seconds,
        })
    );
}
