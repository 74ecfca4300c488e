//! Routing: declarative filters (`routes.yaml`) that send matching changes to consumer-specific
//! Kafka topics, each record with `filterMetadata` and its source coordinates in headers.
//!
//! - [`spec`] loads and checks the file (file, line and filter id in every message);
//! - [`condition`] and [`operand`] evaluate a filter's condition with typed comparisons;
//! - [`output`] renders a routed record as JSON, [`avro`] as Avro;
//! - [`flink_sql`] prints the equivalent Flink SQL, for teams that keep Flink;
//! - [`cli`] is `cdc-lake routes check|test|sql`.
//!
//! The route sink that writes the records, with the delivery contract of the other sinks, is
//! `sink::route`. See docs/routing.md.

pub mod avro;
pub mod cli;
pub mod condition;
pub mod flink_sql;
pub mod operand;
pub mod output;
pub mod spec;
#[cfg(test)]
mod tests;

pub use spec::{Filter, OutputFormat, OutputShape, RouteError, Routes};

use crate::envelope::ChangeEvent;
use condition::SourceFields;

/// What one filter made of one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Selected and its condition is true: route it.
    Routed,
    /// Not selected, or the condition is false or unknown.
    Skipped,
    /// The definition does not fit the change (a type mismatch, a column the table lacks).
    Error(String),
}

impl Filter {
    /// This filter's verdict on one change.
    pub fn verdict(&self, e: &ChangeEvent, source: &SourceFields) -> Verdict {
        if !self.selects(e) {
            return Verdict::Skipped;
        }
        match self.when.as_ref().map(|c| c.eval(e, source)) {
            None | Some(Ok(Some(true))) => Verdict::Routed,
            Some(Ok(_)) => Verdict::Skipped,
            Some(Err(reason)) => Verdict::Error(reason),
        }
    }
}

impl Routes {
    /// Every filter's verdict on one change, in file order.
    pub fn verdicts(&self, e: &ChangeEvent) -> Vec<Verdict> {
        let source = SourceFields::default();
        self.filters.iter().map(|f| f.verdict(e, &source)).collect()
    }
}
