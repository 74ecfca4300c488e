-- cdc-lake's own bookkeeping. Every database a PostgreSQL sink writes to gets this schema, so that
-- each sink's checkpoint lives in the same database (and transaction) as its data.
CREATE SCHEMA IF NOT EXISTS cdc_lake;

-- The next Kafka offset each sink still needs, per consumer group and topic-partition.
-- Updated in the same transaction as the data it covers; it never moves backwards.
CREATE TABLE IF NOT EXISTS cdc_lake.checkpoints (
    sink            text        NOT NULL,
    consumer        text        NOT NULL,
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    next_offset     bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sink, consumer, kafka_topic, kafka_partition)
);
