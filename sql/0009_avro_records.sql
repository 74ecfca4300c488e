-- Changes that arrived as Confluent-framed Avro keep the record exactly as received, and the
-- writer schemas it names are stored once per registry id, so nothing depends on the registry
-- still holding them (a deleted subject, a registry rebuilt with new ids). The decoded columns
-- (event_key, before_data, after_data, row_schema) are filled as for JSON, so a replay needs no
-- registry either.
CREATE TABLE IF NOT EXISTS cdc_raw.cdc_avro_schemas (
    id         bigint      PRIMARY KEY,     -- the registry's schema id
    schema     text        NOT NULL,        -- as GET /schemas/ids/{id} served it
    first_seen timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE cdc_raw.cdc_events
    ADD COLUMN IF NOT EXISTS key_schema_id   bigint,  -- NULL for JSON records
    ADD COLUMN IF NOT EXISTS value_schema_id bigint,
    ADD COLUMN IF NOT EXISTS record_key      bytea,   -- the Avro bytes as received
    ADD COLUMN IF NOT EXISTS record_value    bytea;
