-- The raw audit log: every decoded change envelope with its Kafka coordinates, exactly once.
CREATE SCHEMA IF NOT EXISTS cdc_raw;

CREATE TABLE IF NOT EXISTS cdc_raw.cdc_events (
    kafka_topic      text        NOT NULL,
    kafka_partition  integer     NOT NULL,
    kafka_offset     bigint      NOT NULL,
    kafka_timestamp  timestamptz,
    event_key        jsonb,
    operation        text        NOT NULL,
    source_table     text        NOT NULL,   -- schema.table
    source_db        text,
    before_data      jsonb,                  -- decoded values (decimals exact, timestamps ISO-8601)
    after_data       jsonb,
    source_metadata  jsonb       NOT NULL,   -- Debezium's source block as sent
    transaction_data jsonb,
    source_lsn       bigint,
    commit_lsn       bigint,
    event_timestamp  timestamptz,            -- source commit time (source.ts_ms)
    ingested_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);
CREATE INDEX IF NOT EXISTS cdc_events_table_time ON cdc_raw.cdc_events (source_table, event_timestamp);

-- Records that could not be decoded, byte for byte, with the reason. Nothing is dropped silently.
CREATE TABLE IF NOT EXISTS cdc_raw.cdc_rejects (
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    kafka_timestamp timestamptz,
    raw_key         bytea,
    raw_value       bytea,
    stage           text        NOT NULL,    -- decode | state
    reason          text        NOT NULL,
    rejected_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset, stage)
);
CREATE INDEX IF NOT EXISTS cdc_rejects_reason ON cdc_raw.cdc_rejects (reason);
