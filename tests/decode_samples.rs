//! Every record of the captured Debezium samples decodes, in both JSON forms, and both forms
//! give the same logical values.

mod common;

use cdc_lake::domain::KafkaCoordinates;
use cdc_lake::envelope::{ColumnType, Decoded, Decoder, Op, TimeUnit};
use common::*;
use serde_json::json;

fn decode_all(file: &str) -> Vec<std::sync::Arc<cdc_lake::envelope::ChangeEvent>> {
    let mut decoder = Decoder::new();
    load_fixture(file)
        .into_iter()
        .map(|r| {
            let coords = KafkaCoordinates {
                topic: r.topic.clone(),
                partition: r.partition,
                offset: r.offset,
                timestamp_ms: None,
            };
            match decoder.decode(
                coords,
                r.key.as_deref().map(str::as_bytes),
                r.value.as_deref().map(str::as_bytes),
            ) {
                Decoded::Change(e) => e,
                other => panic!(
                    "{file} {}[{}]@{} did not decode: {other:?}",
                    r.topic, r.partition, r.offset
                ),
            }
        })
        .collect()
}

#[test]
fn every_sample_record_decodes() {
    for file in ["bookstore-seed.ndjson", "bookstore-defaults.ndjson"] {
        let events = decode_all(file);
        assert_eq!(events.len(), 17, "{file}");
        let ops: Vec<Op> = events.iter().map(|e| e.op).collect();
        for op in [Op::Read, Op::Create, Op::Update, Op::Delete] {
            assert!(ops.contains(&op), "{file} has {op:?}");
        }
        for e in &events {
            assert!(e.position.change_lsn > 0, "{file}: every change has an LSN");
            assert!(
                e.key.as_ref().is_some_and(|k| k.is_object()),
                "{file}: key payload without schema"
            );
            assert!(e.row().is_some());
        }
    }
}

#[test]
fn defaults_form_uses_the_connect_schema() {
    let events = decode_all("bookstore-defaults.ndjson");
    let dune = events
        .iter()
        .rfind(|e| {
            e.after
                .as_ref()
                .is_some_and(|a| a.get("title") == Some(&json!("Dune")))
        })
        .unwrap();
    assert!(dune.schema.declared);
    assert_eq!(
        dune.schema.column("price").unwrap().ty,
        ColumnType::Decimal {
            precision: Some(10),
            scale: 2
        }
    );
    assert_eq!(
        dune.schema.column("created_at").unwrap().ty,
        ColumnType::Timestamp(TimeUnit::Micros)
    );
    assert_eq!(dune.schema.column("id").unwrap().ty, ColumnType::Uuid);
    let sql = dune.sql_image(dune.after.as_ref().unwrap(), false).unwrap();
    assert_eq!(sql["price"], json!("17.49"));
    assert_eq!(
        dune.key,
        Some(json!({"id": "11111111-1111-1111-1111-111111111111"}))
    );
}

#[test]
fn both_forms_agree_on_the_final_values() {
    let seed = decode_all("bookstore-seed.ndjson");
    let defaults = decode_all("bookstore-defaults.ndjson");
    let last_price = |events: &[std::sync::Arc<cdc_lake::envelope::ChangeEvent>], title: &str| {
        let e = events
            .iter()
            .rfind(|e| {
                e.after
                    .as_ref()
                    .is_some_and(|a| a.get("title") == Some(&json!(title)))
            })
            .unwrap();
        let v = e.sql_image(e.after.as_ref().unwrap(), false).unwrap()["price"].clone();
        v.as_f64()
            .unwrap_or_else(|| v.as_str().unwrap().parse().unwrap())
    };
    for title in ["Dune", "Emma", "Neuromancer", "Ubik"] {
        assert_eq!(
            last_price(&seed, title),
            last_price(&defaults, title),
            "{title}"
        );
    }
}
