-- The sync summary in a target's own database (a replica or analytics target elsewhere) has no
-- raw-log checkpoint to compare with: say "unknown" (NULL) there instead of 0 records behind.
-- since_last_update is the lag that every database can report.
CREATE OR REPLACE VIEW cdc_raw.cdc_sync_summary AS
SELECT c.sink,
       c.consumer,
       c.kafka_topic,
       c.kafka_partition,
       c.next_offset,
       CASE WHEN r.next_offset IS NOT NULL THEN greatest(r.next_offset - c.next_offset, 0) END AS behind_raw,
       c.updated_at,
       now() - c.updated_at AS since_last_update
  FROM cdc_lake.checkpoints c
  LEFT JOIN cdc_lake.checkpoints r
    ON r.sink = 'raw' AND r.consumer = c.consumer
   AND r.kafka_topic = c.kafka_topic AND r.kafka_partition = c.kafka_partition;
