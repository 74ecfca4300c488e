-- The route sink's progress per filter and source partition (issue 18). Its checkpoint per
-- source partition is in cdc_lake.checkpoints (sink 'route'), locked for the whole of a batch:
-- the records are produced and acknowledged while the lock is held, and the checkpoint and
-- these rows advance in the same transaction.
--
-- output_watermark: an offset of the filter's output partition at or below every record this
-- source partition routed there that the checkpoint does not cover yet. After a crash between
-- the produce and the commit, the next owner reads the output partition from here, finds the
-- records already there by their source coordinates (record headers), and does not route them
-- again.
--
-- live_from: the live route routes this filter's changes of this source partition from this
-- offset on; `cdc-replay --target route:<filter>` routes the ones before it (backfill_next is
-- how far it got), so the two never both route one change. backfill_watermark is the
-- backfill's own output_watermark: the live route never moves it, so records of a backfill
-- that crashed before its commit stay above it.
CREATE TABLE IF NOT EXISTS cdc_lake.route_progress (
    consumer         text    NOT NULL,
    filter_id        text    NOT NULL,
    kafka_topic      text    NOT NULL,
    kafka_partition  integer NOT NULL,
    output_topic     text    NOT NULL,
    output_partition integer NOT NULL,
    output_watermark bigint  NOT NULL,
    live_from        bigint  NOT NULL,
    backfill_next    bigint  NOT NULL DEFAULT 0,
    backfill_watermark bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, filter_id, kafka_topic, kafka_partition)
);
