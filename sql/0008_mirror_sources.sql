-- The source each mirror belongs to. A mirror holds one source table of one source database,
-- so its ordering guard and truncate watermark only ever compare positions of that database's
-- WAL. The first change to reach a mirror records its source here (in the same transaction as
-- the rows); the state sink rejects changes of any other source to it, with advice to set a
-- source-aware `table_name` template (docs/naming.md). `cdc-replay` and `verify` find a source
-- table's mirrors here.
CREATE TABLE IF NOT EXISTS cdc_lake.mirror_sources (
    target_schema text        NOT NULL,
    mirror_table  text        NOT NULL,
    source_server text        NOT NULL,
    source_db     text        NOT NULL,
    source_schema text        NOT NULL,
    source_table  text        NOT NULL,
    claimed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_schema, mirror_table)
);
CREATE INDEX IF NOT EXISTS mirror_sources_by_source
    ON cdc_lake.mirror_sources (target_schema, source_schema, source_table);
