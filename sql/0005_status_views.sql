-- Status views in the raw database, as the seeds' data-lake variant had them.

-- Events per source table and operation, with the first and last source commit time.
CREATE OR REPLACE VIEW cdc_raw.cdc_statistics AS
SELECT source_table,
       operation,
       count(*)             AS events,
       min(event_timestamp) AS first_event,
       max(event_timestamp) AS last_event,
       max(ingested_at)     AS last_ingested
  FROM cdc_raw.cdc_events
 GROUP BY source_table, operation;

-- Per sink or target and partition: how far it is behind the raw log (in records) and since
-- when it last moved. Targets in other databases report in their own database.
CREATE OR REPLACE VIEW cdc_raw.cdc_sync_summary AS
SELECT c.sink,
       c.consumer,
       c.kafka_topic,
       c.kafka_partition,
       c.next_offset,
       greatest(coalesce(r.next_offset, 0) - c.next_offset, 0) AS behind_raw,
       c.updated_at,
       now() - c.updated_at AS since_last_update
  FROM cdc_lake.checkpoints c
  LEFT JOIN cdc_lake.checkpoints r
    ON r.sink = 'raw' AND r.consumer = c.consumer
   AND r.kafka_topic = c.kafka_topic AND r.kafka_partition = c.kafka_partition;
