-- The newest source TRUNCATE applied to each mirror: (commit LSN, change LSN). Changes older than
-- it must not re-create rows even when they arrive after it (another partition, a replay), so the
-- state sink's MERGE inserts only rows newer than this watermark.
CREATE TABLE IF NOT EXISTS cdc_lake.truncations (
    target_schema text   NOT NULL,
    mirror_table  text   NOT NULL,
    commit_lsn    bigint NOT NULL,
    lsn           bigint NOT NULL,
    PRIMARY KEY (target_schema, mirror_table)
);
