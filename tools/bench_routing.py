"""Routing in the benchmark (issue 18): the all-sinks run again with ten filters routing to ten
topics, the cost against the same run without routing, and the oracle: each output topic holds
exactly as many records as the raw log has changes satisfying the filter (SQL over the raw
log's row images), and no source offset twice.

Used by tools/bench.py; the workload is tools/peers/gen_orders.py's orders (CONFIRMED inserts,
SHIPPED updates, deletes; totals 0-100, user ids u<n>)."""
import os
import uuid

from confluent_kafka import Consumer, KafkaError, TopicPartition

# (id, YAML body of the filter without id/consumer/topic, SQL over cdc_raw.cdc_events)
FILTERS = [
    ("shipped", "when: {field: after.status, equals: SHIPPED}",
     "after_data->>'status' = 'SHIPPED'"),
    ("confirmed-big", "when: {and: [{field: after.status, equals: CONFIRMED}, {field: after.total, greaterThan: 90}]}",
     "after_data->>'status' = 'CONFIRMED' AND (after_data->>'total')::numeric > 90"),
    ("band", "when: {field: after.total, between: [10, 20]}",
     "(after_data->>'total')::numeric BETWEEN 10 AND 20"),
    ("deletes", "ops: [d]", "operation = 'd'"),
    ("tiny", "output: after\n    when: {field: after.total, lessThan: 1}",
     "(after_data->>'total')::numeric < 1"),
    ("users-1x", "when: {field: after.user_id, matches: '^u1[0-9]$'}",
     "after_data->>'user_id' ~ '^u1[0-9]$'"),
    ("not-confirmed", "ops: [c, u]\n    when: {not: {field: after.status, equals: CONFIRMED}}",
     "operation IN ('c', 'u') AND after_data->>'status' <> 'CONFIRMED'"),
    ("big-or-shipped", "when: {or: [{field: after.total, greaterThanOrEqual: 99}, {field: after.status, equals: SHIPPED}]}",
     "((after_data->>'total')::numeric >= 99 OR after_data->>'status' = 'SHIPPED')"),
    ("updates-in", "ops: [u]\n    when: {field: after.status, in: [CONFIRMED, SHIPPED]}",
     "operation = 'u' AND after_data->>'status' IN ('CONFIRMED', 'SHIPPED')"),
    ("created", "output: after\n    ops: [c]\n    when: {field: after.created_at, isNotNull: true}",
     "operation = 'c' AND after_data->>'created_at' IS NOT NULL"),
]


def routes_file(out_dir, prefix):
    """Writes the ten filters; returns the path and the output topic of each filter."""
    topics = {fid: f"{prefix}-{fid}" for fid, _, _ in FILTERS}
    lines = ["filters:"]
    for fid, body, _ in FILTERS:
        lines += [f"  - id: {fid}", "    consumer: bench", f"    topic: {topics[fid]}", f"    {body}"]
    path = os.path.join(out_dir, "routes.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, topics


def topic_records(broker, topic):
    """(records, distinct source offsets) in a topic, read to each partition's end as the broker
    reports it (EOF): the dev broker's high watermark can be short of the last batch."""
    c = Consumer({"bootstrap.servers": broker, "group.id": f"bench-count-{uuid.uuid4().hex[:6]}",
                  "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    try:
        md = c.list_topics(topic, timeout=10)
        parts = list(md.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        open_parts, records, sources = set(parts), 0, set()
        while open_parts:
            m = c.poll(1.0)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(m.partition())
                    continue
                raise RuntimeError(f"reading {topic}: {m.error()}")
            records += 1
            h = dict(m.headers() or [])
            sources.add((h.get("cdc.source.topic"), h.get("cdc.source.partition"), h.get("cdc.source.offset")))
        return records, len(sources)
    finally:
        c.close()


def run(bench, binary, broker, topic, n, out_dir, without_routing):
    """The all-sinks run with ten filters; returns the run with its counts check and cost."""
    path, topics = routes_file(out_dir, f"bench-route-{uuid.uuid4().hex[:6]}")
    result = bench.run_ingest(binary, broker, topic, n, ("raw", "lake", "state"),
                              {"CDC_LAKE__ROUTES__FILE": path})
    checks = {}
    for fid, _, sql in FILTERS:
        want = bench.query1(result["dsn"], f"SELECT count(*) FROM cdc_raw.cdc_events WHERE {sql}")
        got, distinct = topic_records(broker, topics[fid])
        checks[fid] = {"expected": want, "routed": got, "distinct_sources": distinct}
    result["filters"] = checks
    result["routed_records"] = sum(c["routed"] for c in checks.values())
    result["counts_ok"] = all(c["expected"] == c["routed"] == c["distinct_sources"] for c in checks.values())
    result["vs_without_routing"] = round(result["events_per_s"] / without_routing["events_per_s"], 2)
    bench.log(f"routing: {len(FILTERS)} filters, {result['routed_records']} records routed, "
              f"{result['vs_without_routing']}x the all-sinks run without routing, counts ok: {result['counts_ok']}")
    return result


def render(r):
    """Markdown lines for the report."""
    routed = r["ingest"]["raw+lake+state+route"]
    lines = [
        "",
        f"Routing: the all-sinks run with {len(FILTERS)} filters on: {routed['events_per_s']:,} events/s, "
        f"{routed['vs_without_routing']}× the same run without routing; {routed['routed_records']:,} records routed "
        f"(peak RSS {routed['peak_rss_mb']} MB).",
        "",
        "| filter | changes satisfying it (raw log, SQL) | records in its topic |",
        "|---|---|---|",
    ]
    for fid, c in routed["filters"].items():
        lines.append(f"| {fid} | {c['expected']:,} | {c['routed']:,} |")
    return lines
