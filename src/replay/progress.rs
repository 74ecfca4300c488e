//! A replay's progress line and its summary.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::compare;
use crate::domain::TableId;
use crate::sink::WriteStats;

/// What a replay did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub events: u64,
    pub stats: WriteStats,
    pub elapsed: Duration,
    pub tables: BTreeSet<TableId>,
    /// For a dry run: the differences the replay would make.
    pub changes: Vec<compare::TableDiff>,
}

impl Summary {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "replayed {} changes in {:.1}s ({:.0} events/s): {} applied, {} not applied",
            self.events,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.stats.written,
            self.stats.ignored.values().sum::<u64>()
        )?;
        for (reason, n) in &self.stats.ignored {
            writeln!(f, "  not applied: {n} {reason}")?;
        }
        let tables: Vec<String> = self.tables.iter().map(ToString::to_string).collect();
        writeln!(f, "  source tables: {}", tables.join(", "))
    }
}

/// A progress line on stderr: a bar with rate and ETA when stderr is a terminal, a log line
/// every 10 s otherwise.
pub struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
    tty: bool,
    label: &'static str,
}

impl Progress {
    pub fn new(total: u64, label: &'static str) -> Self {
        let now = Instant::now();
        Self {
            total,
            done: 0,
            started: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
            label,
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        let every = if self.tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(10)
        };
        if self.last.elapsed() >= every {
            self.last = Instant::now();
            self.print();
        }
    }

    fn print(&self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = self.done as f64 / secs;
        let frac = (self.done as f64 / self.total.max(1) as f64).min(1.0);
        let eta = if rate > 0.0 {
            format!(
                "{:.0}s",
                (self.total.saturating_sub(self.done)) as f64 / rate
            )
        } else {
            "?".into()
        };
        let filled = (frac * 30.0) as usize;
        let line = format!(
            "{} [{}{}] {:>3.0}% {}/{} events  {:.0} events/s  ETA {eta}",
            self.label,
            "#".repeat(filled),
            "-".repeat(30 - filled),
            frac * 100.0,
            self.done,
            self.total,
            rate
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    pub fn finish(&self) {
        self.print();
        if self.tty {
            eprintln!();
        }
    }
}
