//! `cdc-lake routes check|test|sql`: what a team runs in its own CI before a filter reaches the
//! pod.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Deserialize;

use super::{flink_sql, Routes, Verdict};
use crate::config::Config;
use crate::domain::KafkaCoordinates;
use crate::envelope::{ChangeEvent, Decoded, Decoder};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RoutesAction {
    /// Validate the filter file offline: unknown operators, wrong arity, bad regexes, bad
    /// topic names. With --sample, also columns the sample's tables lack and literals their
    /// column types cannot be compared with. Exits 1 on any mistake, each printed as
    /// file:line: filter "id": what is wrong.
    Check(RoutesFile),
    /// For each record of an NDJSON sample, print which filters matched and where the record
    /// would go (exits 1 if a filter cannot be evaluated on a record).
    Test(RoutesFile),
    /// Print each filter as a Flink SQL INSERT … SELECT … WHERE, like the seeds' generator.
    Sql(RoutesFile),
}

#[derive(Debug, Clone, clap::Args)]
pub struct RoutesFile {
    /// The filter file; default: routes.file of the config.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Captured records, one JSON object per line: {"topic", "partition", "offset", "key",
    /// "value"} with key and value as the record strings (the format of
    /// ../shared/debezium-samples and tools/capture-zoo). Required for `test`.
    #[arg(long)]
    pub sample: Option<PathBuf>,
}

/// Why a `routes` command could not run (as opposed to finding mistakes, which exit 1).
#[derive(Debug, thiserror::Error)]
pub enum RoutesCliError {
    #[error("{0}")]
    BadArguments(String),
    #[error("cannot read sample {path}: {reason}")]
    Sample { path: String, reason: String },
}

#[derive(Deserialize)]
struct SampleRecord {
    topic: String,
    #[serde(default)]
    partition: i32,
    #[serde(default)]
    offset: i64,
    #[serde(default)]
    timestamp: Option<i64>,
    key: Option<String>,
    value: Option<String>,
}

/// Decodes every record of a sample file.
fn read_sample(path: &Path) -> Result<Vec<Decoded>, RoutesCliError> {
    let err = |reason: String| RoutesCliError::Sample {
        path: path.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| err(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: SampleRecord =
            serde_json::from_str(&line).map_err(|e| err(format!("line {}: {e}", i + 1)))?;
        let coords = KafkaCoordinates {
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            timestamp_ms: r.timestamp,
        };
        out.push(decoder.decode(
            coords,
            r.key.as_deref().map(str::as_bytes),
            r.value.as_deref().map(str::as_bytes),
        ));
    }
    Ok(out)
}

fn load(config: &Config, args: &RoutesFile) -> Result<Result<Routes, ExitCode>, RoutesCliError> {
    let path = match (&args.file, config.routes.enabled()) {
        (Some(p), _) => p.clone(),
        (None, true) => PathBuf::from(&config.routes.file),
        (None, false) => {
            return Err(RoutesCliError::BadArguments(
                "no filter file: pass --file or set routes.file in the config".into(),
            ))
        }
    };
    Ok(Routes::load(&path).map_err(|errors| {
        for e in &errors {
            eprintln!("{e}");
        }
        eprintln!("{} mistake(s) in {}", errors.len(), path.display());
        ExitCode::FAILURE
    }))
}

pub fn cli(config: &Config, action: &RoutesAction) -> Result<ExitCode, RoutesCliError> {
    match action {
        RoutesAction::Check(args) => {
            let routes = match load(config, args)? {
                Ok(r) => r,
                Err(code) => return Ok(code),
            };
            let mut problems = 0;
            if let Some(sample) = &args.sample {
                let changes = read_sample(sample)?;
                let mut seen = BTreeMap::new();
                for d in &changes {
                    if let Decoded::Change(e) = d {
                        seen.entry(e.table.to_string()).or_insert_with(|| e.clone());
                    }
                }
                for f in &routes.filters {
                    for e in seen.values() {
                        if !f.selects_table(e) {
                            continue;
                        }
                        for p in f.check_schema(&e.table.to_string(), &e.schema) {
                            eprintln!(
                                "{}:{}: filter {:?}: {p}",
                                routes.path.display(),
                                f.line,
                                f.id
                            );
                            problems += 1;
                        }
                    }
                }
            }
            if problems > 0 {
                eprintln!("{problems} mistake(s) in {}", routes.path.display());
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "{}: {} filter(s), all valid",
                routes.path.display(),
                routes.filters.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        RoutesAction::Test(args) => {
            let routes = match load(config, args)? {
                Ok(r) => r,
                Err(code) => return Ok(code),
            };
            let Some(sample) = &args.sample else {
                return Err(RoutesCliError::BadArguments(
                    "routes test needs --sample FILE.ndjson".into(),
                ));
            };
            let mut failed = false;
            for d in read_sample(sample)? {
                let c = d.coords();
                let at = format!("{}[{}]@{}", c.topic, c.partition, c.offset);
                let Decoded::Change(e) = &d else {
                    println!(
                        "{at}\tnot a change (skipped or rejected at decode): no filter sees it"
                    );
                    continue;
                };
                let line = describe(&routes, e, &mut failed);
                println!("{at}\t{} {}\t{line}", e.table, e.op.code());
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        RoutesAction::Sql(args) => {
            let routes = match load(config, args)? {
                Ok(r) => r,
                Err(code) => return Ok(code),
            };
            let mut failed = false;
            for f in &routes.filters {
                match flink_sql::filter_sql(f) {
                    Ok(sql) => println!("{sql}"),
                    Err(reason) => {
                        eprintln!(
                            "{}:{}: filter {:?}: {reason}",
                            routes.path.display(),
                            f.line,
                            f.id
                        );
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// `filter -> topic` for each match, `filter: error …` for each failure, or `no match`.
fn describe(routes: &Routes, e: &ChangeEvent, failed: &mut bool) -> String {
    let parts: Vec<String> = routes
        .filters
        .iter()
        .zip(routes.verdicts(e))
        .filter_map(|(f, v)| match v {
            Verdict::Routed => Some(format!("{} -> {}", f.id, f.topic)),
            Verdict::Skipped => None,
            Verdict::Error(reason) => {
                *failed = true;
                Some(format!("{}: ERROR {reason}", f.id))
            }
        })
        .collect();
    if parts.is_empty() {
        "no match".into()
    } else {
        parts.join(", ")
    }
}
