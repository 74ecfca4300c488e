//! cdc-lake: Debezium change events from Kafka into a PostgreSQL raw log, a Parquet lake and
//! current-state mirrors, exactly once in effect.
//!
//! ```text
//!  Kafka ──► source      consumer group on its own thread; seeks each assigned partition to
//!            │           the lowest sink checkpoint; decodes once at the edge (envelope)
//!            ▼
//!          envelope      ChangeEvent | Skip(reason) | Reject(reason)
//!            ▼
//!          batch         closes by count, bytes or age
//!            ▼
//!          pipeline ──►  sink::raw    COPY into cdc_raw.cdc_events / cdc_rejects ┐ each stores its
//!            │      ──►  sink::lake   Parquet per table/date + manifest          │ checkpoint with
//!            │      ──►  sink::state  staging COPY + guarded MERGE per table     ┘ its data
//!            ▼
//!          Kafka commit = lowest durable checkpoint (monitoring only)
//! ```
//!
//! See `docs/architecture.md` and `docs/delivery-semantics.md`.

pub mod batch;
pub mod cli;
pub mod compact;
pub mod config;
pub mod db;
pub mod domain;
pub mod envelope;
pub mod http;
pub mod ingest;
pub mod naming;
pub mod pipeline;
pub mod rejects;
pub mod replay;
pub mod route;
pub mod sink;
pub mod source;
pub mod telemetry;
