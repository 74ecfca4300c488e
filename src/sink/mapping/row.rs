//! One change as the row of a mapping: source columns, constants, source and change metadata,
//! each converted for its target column.

use serde_json::{Map, Value};

use super::{ColumnMap, MappedRow, Mapping};
use crate::config::{EpochUnit, Input, MetaField, SourceField, Transform};
use crate::domain::TableId;
use crate::envelope::value::UNAVAILABLE_VALUE;
use crate::envelope::{ChangeEvent, Op, ValueForm};
use crate::sink::coerce::{decimal, epoch, epoch_days, epoch_to, numeric_scale, Kind};

impl Mapping {
    /// The mapped change: same coordinates and position, the target table, the mapped key and
    /// row (SQL-ready values; TOAST placeholders kept so the apply treats them as unchanged).
    /// `None` for what this mapping does not apply (logical messages). The error is the reject
    /// reason.
    pub fn apply(
        &self,
        e: &ChangeEvent,
        schema: &str,
        synced_at: &str,
    ) -> Result<Option<ChangeEvent>, String> {
        let table = TableId {
            schema: schema.to_string(),
            table: self.table.clone(),
        };
        let mapped = |key: Option<Map<String, Value>>, row: Option<Map<String, Value>>| {
            Some(ChangeEvent {
                coords: e.coords.clone(),
                key: key.map(Value::Object),
                op: e.op,
                table: table.clone(),
                before: None,
                after: row,
                values: ValueForm::Sql,
                source: e.source.clone(),
                source_json: e.source_json.clone(),
                transaction: None,
                ts_ms: e.ts_ms,
                schema: self.no_schema.clone(),
                position: e.position,
                raw_value: e.raw_value.clone(),
                raw_key: e.raw_key.clone(),
                avro: e.avro.clone(),
            })
        };
        match e.op {
            Op::Message => return Ok(None),
            Op::Truncate => return Ok(mapped(None, None)),
            _ => {}
        }
        let m = self.map_row(e, synced_at)?;
        Ok(mapped(Some(m.key), Some(m.row)))
    }

    fn map_row(&self, e: &ChangeEvent, synced_at: &str) -> Result<MappedRow, String> {
        let is_delete = e.op == Op::Delete;
        // Deletes carry the key (and, under REPLICA IDENTITY FULL, the old row) in `before`.
        let mut source: Map<String, Value> = match e.row() {
            Some(image) => e.sql_image(image, true)?.into_owned(),
            None => Map::new(),
        };
        if let Some(Value::Object(k)) = &e.key {
            for (c, v) in k {
                source.entry(c.clone()).or_insert_with(|| v.clone());
            }
        }
        let mut row = Map::new();
        for c in &self.columns {
            // A delete writes only the key and the change's metadata: the data columns of
            // `before` are mostly null under the default replica identity.
            if is_delete && matches!(c.input, Input::Column(_)) && !self.key.contains(&c.target) {
                continue;
            }
            let value = match &c.input {
                Input::Column(name) => match source.get(name) {
                    Some(v) => convert(v, c, self.epoch_unit)
                        .map_err(|m| format!("{}: column {}: {m}", self.label, c.target))?,
                    None if e.after.is_some() && !is_delete => {
                        return Err(format!(
                            "{}: column {}: the change of {} has no column {name}",
                            self.label, c.target, e.table
                        ))
                    }
                    None => Value::Null,
                },
                Input::Constant(v) => v.clone(),
                Input::Source(f) => convert_meta(source_field(e, *f), c.kind),
                Input::Meta(MetaField::SyncedAt) => Value::String(synced_at.to_string()),
                Input::Meta(f) => convert_meta(meta_field(e, *f), c.kind),
            };
            row.insert(c.target.clone(), value);
        }
        let mut key = Map::new();
        for k in &self.key {
            match row.get(k) {
                Some(v) if !v.is_null() && v.as_str() != Some(UNAVAILABLE_VALUE) => {
                    key.insert(k.clone(), v.clone());
                }
                _ => {
                    return Err(format!(
                        "{}: key column {k} is null or missing in this change of {}{}",
                        self.label,
                        e.table,
                        if is_delete {
                            " (a delete carries only the source's key columns unless the table has REPLICA IDENTITY FULL)"
                        } else {
                            ""
                        }
                    ))
                }
            }
        }
        Ok(MappedRow { key, row })
    }
}

fn source_field(e: &ChangeEvent, f: SourceField) -> Value {
    let s = &e.source;
    let text = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    match f {
        SourceField::Connector => text(&s.connector),
        SourceField::Name => text(&s.name),
        SourceField::Db => text(&s.db),
        SourceField::Schema => Value::String(e.table.schema.clone()),
        SourceField::Table => Value::String(e.table.table.clone()),
        SourceField::TsMs => s.ts_ms.map_or(Value::Null, Value::from),
        SourceField::Snapshot => text(&s.snapshot),
        SourceField::TxId => s.tx_id.map_or(Value::Null, Value::from),
        SourceField::Lsn => s.lsn.map_or(Value::Null, Value::from),
        SourceField::Sequence => text(&s.sequence),
    }
}

fn meta_field(e: &ChangeEvent, f: MetaField) -> Value {
    match f {
        MetaField::Op => Value::String(e.op.code().to_string()),
        MetaField::TsMs => e.ts_ms.map_or(Value::Null, Value::from),
        MetaField::KafkaTopic => Value::String(e.coords.topic.clone()),
        MetaField::KafkaPartition => Value::from(e.coords.partition),
        MetaField::KafkaOffset => Value::from(e.coords.offset),
        MetaField::SyncedAt => unreachable!("filled in by the caller"),
    }
}

/// Metadata values are typed already; epoch milliseconds become timestamps for temporal columns.
fn convert_meta(v: Value, kind: Kind) -> Value {
    if kind.temporal() {
        if let Some(ms) = v.as_i64() {
            return epoch_to(ms.saturating_mul(1000), kind).unwrap_or(v);
        }
    }
    v
}

/// Converts one source value for its target column.
fn convert(v: &Value, c: &ColumnMap, unit: EpochUnit) -> Result<Value, String> {
    if v.is_null() || v.as_str() == Some(UNAVAILABLE_VALUE) {
        return Ok(v.clone());
    }
    match c.transform {
        Transform::Epoch(unit) => epoch(v, unit, c.kind),
        Transform::Decimal { scale } => decimal(v, scale.or(numeric_scale(c.kind))),
        Transform::Auto => match c.kind {
            // Debezium's Date: days since the epoch.
            Kind::Date if v.is_i64() => epoch_days(v.as_i64().expect("checked")),
            Kind::TimestampTz | Kind::Timestamp | Kind::Time if v.is_number() => {
                epoch(v, unit, c.kind)
            }
            Kind::Numeric { scale } if !v.is_number() => decimal(v, scale),
            _ => Ok(v.clone()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::mapping::catalog::check_convertible;

    fn column(kind: Kind, transform: Transform) -> ColumnMap {
        ColumnMap {
            target: "c".into(),
            input: Input::Column("c".into()),
            transform,
            kind,
            formatted_type: String::new(),
        }
    }

    #[test]
    fn epochs_become_the_column_type() {
        let ms = Value::from(1_709_375_445_123i64);
        let tz = column(Kind::TimestampTz, Transform::Epoch(EpochUnit::Ms));
        assert_eq!(
            convert(&ms, &tz, EpochUnit::Ms).unwrap(),
            "2024-03-02T10:30:45.123000Z"
        );
        let naive = column(Kind::Timestamp, Transform::Auto);
        assert_eq!(
            convert(&ms, &naive, EpochUnit::Ms).unwrap(),
            "2024-03-02T10:30:45.123000"
        );
        let us = column(Kind::TimestampTz, Transform::Auto);
        assert_eq!(
            convert(&Value::from(1_709_375_445_123_456i64), &us, EpochUnit::Us).unwrap(),
            "2024-03-02T10:30:45.123456Z"
        );
        let date = column(Kind::Date, Transform::Auto);
        assert_eq!(
            convert(&Value::from(19_784), &date, EpochUnit::Ms).unwrap(),
            "2024-03-02"
        );
        // Already a timestamp (a ZonedTimestamp string): unchanged.
        let s = Value::String("2024-03-02T10:30:45.123456Z".into());
        assert_eq!(convert(&s, &tz, EpochUnit::Ms).unwrap(), s);
        assert!(convert(&Value::Bool(true), &tz, EpochUnit::Ms)
            .unwrap_err()
            .contains("expected an epoch number"));
    }

    #[test]
    fn debezium_decimals_become_numbers() {
        // 12345 unscaled = 0x3039, base64 "MDk=".
        let b64 = Value::String("MDk=".into());
        let by_type = column(Kind::Numeric { scale: Some(2) }, Transform::Auto);
        assert_eq!(convert(&b64, &by_type, EpochUnit::Ms).unwrap(), "123.45");
        let explicit = column(Kind::Float, Transform::Decimal { scale: Some(3) });
        assert_eq!(convert(&b64, &explicit, EpochUnit::Ms).unwrap(), "12.345");
        let variable = serde_json::json!({"scale": 1, "value": "MDk="});
        assert_eq!(
            convert(&variable, &explicit, EpochUnit::Ms).unwrap(),
            "1234.5"
        );
        let double = Value::from(25.98);
        assert_eq!(convert(&double, &by_type, EpochUnit::Ms).unwrap(), double);
        let no_scale = column(Kind::Numeric { scale: None }, Transform::Auto);
        assert!(convert(&b64, &no_scale, EpochUnit::Ms)
            .unwrap_err()
            .contains("give its scale"));
        assert_eq!(
            Kind::of("numeric", "numeric(10,2)"),
            Kind::Numeric { scale: Some(2) }
        );
    }

    #[test]
    fn transforms_that_cannot_fill_the_column_are_refused() {
        let mut c = column(Kind::Integer, Transform::Epoch(EpochUnit::Ms));
        c.formatted_type = "integer".into();
        assert_eq!(
            check_convertible(&c).unwrap_err(),
            "cannot convert: it produces a timestamp, which a column of type integer cannot hold"
        );
        c.input = Input::Source(SourceField::Db);
        c.transform = Transform::Auto;
        assert!(check_convertible(&c).is_err());
        c.input = Input::Source(SourceField::Lsn);
        assert!(check_convertible(&c).is_ok());
    }
}
