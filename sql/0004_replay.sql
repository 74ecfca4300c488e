-- What a replay needs to rebuild a target exactly as the live pod built it.

-- Declared (Connect) row schemas, stored once each, so that a replay from the raw log creates
-- mirror columns with the same types as the live pod did. Inferred (schemaless) rows have none:
-- a replay infers them again from the stored values, as the live pod did.
CREATE TABLE IF NOT EXISTS cdc_raw.cdc_row_schemas (
    id         bigint      PRIMARY KEY,     -- RowSchema::fingerprint
    columns    jsonb       NOT NULL,        -- [{name, ty}, ...] in source order
    first_seen timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE cdc_raw.cdc_events ADD COLUMN IF NOT EXISTS row_schema bigint;
