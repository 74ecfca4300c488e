"""How cdc-lake's cost grows (the scaling section of tools/bench).

Short all-sinks runs on synthetic Debezium envelopes (schemaless, one topic, 80% creates and 20%
updates of earlier keys), each varying one dimension from a base of 5 columns, ~100-byte values,
1 table and 4 partitions:
  - row width: 5, 50, 200 columns;
  - value size: ~100 B and 10 kB text (TOAST-sized);
  - tables: 1, 100, 1,000, interleaved in the one topic (each change names its table in `source`,
    as Debezium does; the pod keeps one lake buffer, one mirror and one Delta table per table);
  - partitions: 4, 64, 256;
and replay time against log size (prefixes of the main run's raw log, `--to-offset`).
Each point reports events/s, MB/s of record values and the pod's peak RSS, and is checked: every
event once in the raw log and each mirror holding one row per key.
"""
import json
import random
import re
import subprocess
import time
import uuid
import zlib

import psycopg2
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

BASE = {"columns": 5, "value_bytes": 100, "tables": 1, "partitions": 4}
CURVES = {
    "columns": [5, 50, 200],
    "value_bytes": [100, 10_000],
    "tables": [1, 100, 1000],
    "partitions": [4, 64, 256],
}
LABELS = {"columns": "row width (columns)", "value_bytes": "value size (bytes)",
          "tables": "tables (interleaved)", "partitions": "partitions"}


def column_value(j, i, value_bytes):
    """Column j of row i: int, float, bool, epoch-millis and text in turn; the first text column
    carries the value size."""
    kind = j % 5
    if kind == 0:
        return i * 31 + j
    if kind == 1:
        return round(random.random() * 1000, 2)
    if kind == 2:
        return (i + j) % 2 == 0
    if kind == 3:
        return 1_709_123_456_789 + i
    if j == 4:
        return ("v%d-" % i + "x" * value_bytes)[:value_bytes]
    return "s%d" % (i % 97)


def produce(broker, topic, n, columns, value_bytes, tables, partitions):
    """`n` envelopes into a new topic of `partitions` partitions; returns the produced value bytes."""
    admin = AdminClient({"bootstrap.servers": broker})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result()
    p = Producer({"bootstrap.servers": broker, "linger.ms": 20, "batch.num.messages": 10000,
                  "message.max.bytes": 64 * 1024 * 1024})
    random.seed(11)
    keys = {}  # table -> ids created so far
    total, lsn = 0, 26_000_000
    for i in range(n):
        lsn += 100
        table = "t%04d" % (i % tables)
        ids = keys.setdefault(table, [])
        if ids and random.random() < 0.2:
            oid, op = random.choice(ids), "u"
        else:
            oid, op = i, "c"
            ids.append(oid)
        after = {"id": oid}
        after.update({"c%03d" % j: column_value(j, i, value_bytes) for j in range(1, columns)})
        now = 1_709_123_456_789 + i
        value = json.dumps({"before": None, "after": after,
                            "source": {"version": "3.6.3.Final", "connector": "postgresql", "name": "scale",
                                       "ts_ms": now, "snapshot": "false", "db": "scaledb", "schema": "public",
                                       "table": table, "txId": 700 + i, "lsn": lsn},
                            "transaction": None, "op": op, "ts_ms": now + 5})
        total += len(value)
        key = json.dumps({"id": oid})
        # Keyed by table and id, as Debezium partitions by key: a key's changes stay in order.
        p.produce(topic, key=key, value=value, partition=zlib.crc32(key.encode() + table.encode()) % partitions)
        if i % 5000 == 0:
            p.poll(0)
    p.flush(120)
    return total


def check(dsn, n, tables):
    """Every event once in the raw log, and each mirror one row per key."""
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute("SELECT count(*), count(DISTINCT (kafka_partition, kafka_offset)) FROM cdc_raw.cdc_events")
        raw, distinct = cur.fetchone()
        cur.execute("SELECT count(*) FROM (SELECT DISTINCT source_table, event_key FROM cdc_raw.cdc_events) k")
        keys = cur.fetchone()[0]
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'cdc_processed'")
        mirrors = [t for (t,) in cur.fetchall()]
        mirror_rows = 0
        for t in mirrors:
            cur.execute(f'SELECT count(*) FROM cdc_processed."{t}"')
            mirror_rows += cur.fetchone()[0]
    finally:
        conn.close()
    ok = raw == n and distinct == n and len(mirrors) == tables and mirror_rows == keys
    return ok, {"raw": raw, "raw_distinct": distinct, "mirrors": len(mirrors), "mirror_rows": mirror_rows, "keys": keys}


def point(bench, binary, broker, events, **dims):
    """One all-sinks run at `dims` (BASE otherwise)."""
    d = {**BASE, **dims}
    # Fewer events for 10 kB values, so each point takes seconds, not minutes.
    n = events if d["value_bytes"] <= 1000 else max(events // 4, 1000)
    topic = f"bench-scale-{uuid.uuid4().hex[:6]}.public.t"
    value_bytes = produce(broker, topic, n, d["columns"], d["value_bytes"], d["tables"], d["partitions"])
    dsn = bench.fresh_db("scale")
    pod = bench.Pod(binary, broker, topic, dsn)
    t0, t1 = pod.wait_committed(topic, n)
    peak = pod.stop()
    ok, counts = check(dsn, n, d["tables"])
    secs = t1 - t0
    r = {**d, "events": n, "seconds": round(secs, 2), "events_per_s": round(n / secs),
         "mb_per_s": round(value_bytes / secs / 1e6, 1), "peak_rss_mb": round(peak / 1024, 1),
         "counts_ok": ok, "counts": counts}
    bench.log(f"scaling {dims}: {r['events_per_s']} events/s, {r['mb_per_s']} MB/s, peak RSS {r['peak_rss_mb']} MB, "
              f"counts {'ok' if ok else 'FAILED ' + str(counts)}")
    return r


def replay_curve(bench, binary, result, n):
    """`cdc-replay --rebuild` of growing prefixes of an all-sinks run's raw log (one partition)."""
    sizes = sorted({max(n // 10, 1), max(n // 4, 1), max(n // 2, 1), n})
    out = []
    for size in sizes:
        env = bench.replay_env(result, f"replay_scale_{size}")
        t0 = time.time()
        run = subprocess.run([binary, "replay", "--target", "bench", "--rebuild", "--source", "raw",
                              "--to-offset", str(size - 1)], env=env, capture_output=True, text=True, timeout=1800)
        secs = time.time() - t0
        if run.returncode != 0:
            raise RuntimeError(f"replay --to-offset {size - 1} failed: {run.stderr}")
        m = re.search(r"replayed (\d+) changes", run.stdout)
        events = int(m.group(1)) if m else 0
        out.append({"log_events": size, "replayed": events, "seconds": round(secs, 2),
                    "events_per_s": round(events / secs), "ok": events == size})
        bench.log(f"replay of the first {size} events: {secs:.2f}s ({events} replayed)")
    return out


def run(bench, binary, broker, events, main_result):
    """Every curve; returns {"curves": {dimension: [points]}, "replay": [...], "counts_ok": bool}."""
    curves = {}
    base = point(bench, binary, broker, events)
    for dim, values in CURVES.items():
        curves[dim] = [base if v == BASE[dim] else point(bench, binary, broker, events, **{dim: v}) for v in values]
    replay = replay_curve(bench, binary, main_result, main_result["events"])
    ok = all(p["counts_ok"] for c in curves.values() for p in c) and all(r["ok"] for r in replay)
    return {"events_per_point": events, "curves": curves, "replay": replay, "counts_ok": ok}


def plot(scaling, path):
    """The curves as one PNG: throughput and peak RSS per dimension, and replay time per log size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = list(scaling["curves"])
    fig, grid = plt.subplots(2, 3, figsize=(13, 7))
    axes = list(grid.flat)
    axes[-1].axis("off")
    for ax, dim in zip(axes, dims):
        pts = scaling["curves"][dim]
        xs = [p[dim] for p in pts]
        ax.plot(xs, [p["events_per_s"] for p in pts], "o-", color="tab:blue")
        ax.set_xscale("log")
        ax.set_xlabel(LABELS[dim])
        ax.set_ylabel("events/s (all sinks)", color="tab:blue")
        ax.set_ylim(bottom=0)
        mem = ax.twinx()
        mem.plot(xs, [p["peak_rss_mb"] for p in pts], "s--", color="tab:red")
        mem.set_ylabel("peak RSS, MB", color="tab:red")
        mem.set_ylim(bottom=0)
    ax = axes[len(dims)]
    rp = scaling["replay"]
    ax.plot([r["log_events"] for r in rp], [r["seconds"] for r in rp], "o-", color="tab:green")
    ax.set_xlabel("raw log size (events)")
    ax.set_ylabel("cdc-replay --rebuild, seconds")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    fig.suptitle(f"cdc-lake: how cost grows ({scaling['events_per_point']:,} events per point, all sinks)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render_md(scaling):
    lines = ["", "## How cost grows (all sinks; one dimension varied from 5 columns, ~100 B values, 1 table, 4 partitions)", "",
             "| dimension | value | events | events/s | MB/s of values | peak RSS, MB | counts |", "|---|---|---|---|---|---|---|"]
    for dim, pts in scaling["curves"].items():
        for p in pts:
            lines.append(f"| {LABELS[dim]} | {p[dim]:,} | {p['events']:,} | {p['events_per_s']:,} | {p['mb_per_s']} | "
                         f"{p['peak_rss_mb']} | {'ok' if p['counts_ok'] else 'FAILED'} |")
    lines += ["", "| raw log size | replay seconds | events/s |", "|---|---|---|"]
    lines += [f"| {r['log_events']:,} | {r['seconds']} | {r['events_per_s']:,} |" for r in scaling["replay"]]
    return "\n".join(lines) + "\n"
