-- The route sink's produce attempts per source partition. A writer counts its attempt here, in
-- a transaction of its own that commits before it produces, while it holds the partition's
-- checkpoint lock. The next writer to take the lock compares the count with the one it made
-- last: if another writer has attempted since (and perhaps crashed after producing, before its
-- commit), it reads the output tails before routing, even though the checkpoint itself has not
-- moved. Without it, an old owner that missed its revoke would route again what a successor
-- produced and never committed.
CREATE TABLE IF NOT EXISTS cdc_lake.route_attempts (
    consumer        text    NOT NULL,
    kafka_topic     text    NOT NULL,
    kafka_partition integer NOT NULL,
    attempt         bigint  NOT NULL,
    PRIMARY KEY (consumer, kafka_topic, kafka_partition)
);
