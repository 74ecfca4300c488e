-- A partition's log can lose what a checkpoint counted: the broker lost its data, the topic was
-- deleted and created again, or an unclean leader election cut it back. Its offsets then start
-- over, below the checkpoints, and every new record would pass as "already stored". The pod
-- detects a checkpoint past the log's end when it takes the partition, moves that sink back to
-- the log's start, and records it here (docs/delivery-semantics.md, "A log that starts over").
CREATE TABLE IF NOT EXISTS cdc_lake.log_resets (
    sink            text        NOT NULL,
    consumer        text        NOT NULL,
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    stale_offset    bigint      NOT NULL,   -- the checkpoint that was past the log's end
    log_start       bigint      NOT NULL,   -- the log's bounds when the reset was seen
    log_end         bigint      NOT NULL,
    detected_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sink, consumer, kafka_topic, kafka_partition, detected_at)
);

-- The raw log keeps what the old log held: rows whose offsets the new log reuses move here (same
-- columns, plus when), so the audit loses nothing and the new records can be stored.
CREATE TABLE IF NOT EXISTS cdc_raw.cdc_events_superseded (LIKE cdc_raw.cdc_events INCLUDING DEFAULTS);
ALTER TABLE cdc_raw.cdc_events_superseded
    ADD COLUMN IF NOT EXISTS superseded_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX IF NOT EXISTS cdc_events_superseded_coords
    ON cdc_raw.cdc_events_superseded (kafka_topic, kafka_partition, kafka_offset);

CREATE TABLE IF NOT EXISTS cdc_raw.cdc_rejects_superseded (LIKE cdc_raw.cdc_rejects INCLUDING DEFAULTS);
ALTER TABLE cdc_raw.cdc_rejects_superseded
    ADD COLUMN IF NOT EXISTS superseded_at timestamptz NOT NULL DEFAULT now();
