//! Declarative topic→table mappings: how a change of a source table becomes a row of an
//! analytics table (renames, transforms, constants, source metadata, a delete policy, a row
//! filter). A target with mappings applies only what they map, with the same staging COPY and
//! guarded MERGE as the mirrors (`sink::state`).
//!
//! A mapping is checked twice: offline when the config loads (`config::MappingConfig::check`:
//! syntax, transforms, keys present), and against the target database's catalog when the
//! target is opened ([`Mapping::prepare`], in `catalog`: the table and every column exist, the
//! key is the table's primary key or a unique index, each transform can produce the column's
//! type, constants and the filter are valid SQL for the table). Either failure stops start-up
//! with a message that names the mapping and the column. `row` turns one change into its row.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::coerce::Kind;
use crate::config::{DeleteMode, EpochUnit, Input, MappingConfig, TopicMatch, Transform};
pub use crate::config::{DELETED_COLUMN, POSITION_COLUMN};
use crate::envelope::RowSchema;

mod catalog;
mod row;

#[derive(Debug, Clone)]
struct ColumnMap {
    target: String,
    input: Input,
    transform: Transform,
    /// Filled in by [`Mapping::prepare`].
    kind: Kind,
    formatted_type: String,
}

/// One compiled mapping.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// `targets.<name>.mappings[i] (<table>)`: how messages name this mapping.
    pub label: String,
    topic: TopicMatch,
    pub table: String,
    pub key: Vec<String>,
    pub delete: DeleteMode,
    pub filter: Option<String>,
    all_columns: bool,
    epoch_unit: EpochUnit,
    columns: Vec<ColumnMap>,
    /// Empty: mapped rows carry no Connect schema (their values are already SQL-ready).
    no_schema: Arc<RowSchema>,
}

/// A row a mapping produced from one change.
pub struct MappedRow {
    pub key: Map<String, Value>,
    pub row: Map<String, Value>,
}

impl Mapping {
    /// Checks one `[[targets.<target>.mappings]]` entry without I/O and compiles it.
    pub fn compile(target: &str, index: usize, cfg: &MappingConfig) -> Result<Mapping, String> {
        let checked = cfg.check(target, index)?;
        Ok(Mapping {
            label: checked.label,
            topic: checked.topic,
            table: cfg.table.clone(),
            key: cfg.key.clone(),
            delete: cfg.delete,
            filter: cfg.filter.clone(),
            all_columns: cfg.all_columns,
            epoch_unit: cfg.epoch_unit,
            columns: checked
                .columns
                .into_iter()
                .map(|(target, input, transform)| ColumnMap {
                    target,
                    input,
                    transform,
                    kind: Kind::Other,
                    formatted_type: String::new(),
                })
                .collect(),
            no_schema: Arc::new(RowSchema::default()),
        })
    }

    pub fn matches(&self, topic: &str) -> bool {
        self.topic.matches(topic)
    }

    /// The target columns this mapping writes, in table order after [`Mapping::prepare`].
    pub fn target_columns(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.target.clone()).collect()
    }
}
