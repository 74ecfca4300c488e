"""cdc-lake benchmark harness (run through tools/bench).

Measures, in one run on this machine:
  - the peer: the seeds' Python consumer (tools/peers/seed_consumer.py) on the same stream;
  - cdc-lake ingest with raw log + lake + mirror, and each sink alone;
  - the COPY ceiling: psql \\copy of the same raw rows into an identical table;
  - latency: produce-to-visible in cdc_processed at a fixed offered rate;
  - memory: peak RSS on a large backlog, and RSS at steady state;
  - ceilings: the broker read ceiling (a bare librdkafka consumer draining the topic) and the
    Parquet encode ceiling (arrow-rs writing the lake's rows from memory);
  - how cost grows with row width, value size, tables and partitions, and replay time against
    log size (tools/bench_scaling.py), as a table and a PNG plot;
  - with --peers flink, the seeds' Flink SQL job on the same workload (tools/bench_flink.py).
Every figure is reported as a ratio to its ceiling, its peer or its target (TARGETS).
The stream is tools/peers/gen_orders.py's: schemaless order envelopes, 70% c, 25% u, 5% d.
"""
import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import psycopg2
from confluent_kafka import Producer

import bench_flink
import bench_routing
import bench_scaling

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
PG_BASE = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")


def log(msg):
    print(f"[bench {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def fresh_db(name):
    db = f"cdcb_{name}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(f"{PG_BASE}/postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {db}")
    admin.close()
    return f"{PG_BASE}/{db}"


def drop_bench_dbs():
    admin = psycopg2.connect(f"{PG_BASE}/postgres")
    admin.autocommit = True
    cur = admin.cursor()
    cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'cdcb\\_%'")
    for (db,) in cur.fetchall():
        cur.execute(f"DROP DATABASE IF EXISTS {db}")
    admin.close()


def query1(dsn, sql):
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute(sql)
        return cur.fetchone()[0]
    finally:
        conn.close()


def produce_orders(broker, topic, n):
    t0 = time.time()
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "peers", "gen_orders.py"), broker, topic, str(n)],
                         capture_output=True, text=True, check=True)
    log(f"produced {n} envelopes to {topic} in {time.time() - t0:.1f}s ({out.stdout.strip()})")


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def metrics(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""


def metric_sum(text, name, topic=None):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and (topic is None or f'topic="{topic}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Pod:
    """The cdc-lake binary as a child process, with its own database, group and lake."""

    def __init__(self, binary, broker, topic, dsn, sinks=("raw", "lake", "state"), extra=None):
        self.port = free_port()
        self.lake = tempfile.mkdtemp(prefix="cdc-bench-lake-")
        env = dict(os.environ)
        env.update({
            "CDC_LAKE__KAFKA__BROKERS": broker,
            "CDC_LAKE__KAFKA__GROUP_ID": f"bench-{uuid.uuid4().hex[:8]}",
            "CDC_LAKE__KAFKA__TOPICS": f"['{topic}']",
            "CDC_LAKE__POSTGRES__URL": dsn,
            "CDC_LAKE__HTTP__LISTEN": f"127.0.0.1:{self.port}",
            "CDC_LAKE__LAKE__ROOT": self.lake,
            "CDC_LAKE__LAKE__ROLL_AGE": "1s",
            "CDC_LAKE__RAW__ENABLED": str("raw" in sinks).lower(),
            "CDC_LAKE__LAKE__ENABLED": str("lake" in sinks).lower(),
            "CDC_LAKE__STATE__ENABLED": str("state" in sinks).lower(),
            # Without the demo's analytics and replica targets: the bench measures the sinks.
            "CDC_LAKE__TARGETS": "{}",
            "RUST_LOG": "warn",
        })
        env.update(extra or {})
        self.log = open(os.path.join(self.lake, "..", os.path.basename(self.lake) + ".log"), "w")
        self.proc = subprocess.Popen([binary, "ingest"], env=env, stdout=self.log, stderr=self.log)
        # (time, committed offset) at each look while waiting: for the steady-state rate.
        self.committed_samples = []

    def steady_rate(self, n):
        """Events/s while the commits went from 10% to 90% of n: the run's rate without the
        pod's start-up and without the last lake roll, which waits for `lake.roll_age`."""
        def crossed(share):
            return next(t for t, c in self.committed_samples if c >= share * n)
        t10, t90 = crossed(0.1), crossed(0.9)
        return round(0.8 * n / (t90 - t10)) if t90 > t10 else None

    def metrics(self):
        return metrics(self.port)

    def wait_committed(self, topic, n, timeout=1800, on_tick=None):
        """Waits until Kafka commits (the lowest durable sink checkpoint) reach n; returns the
        time of the first consumed record and of completion."""
        first, deadline = None, time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cdc-lake exited with {self.proc.returncode}; see {self.log.name}")
            m = self.metrics()
            if first is None and metric_sum(m, "cdc_lake_records_consumed_total", topic) > 0:
                first = time.time()
            if on_tick:
                on_tick()
            committed = metric_sum(m, "cdc_lake_committed_offset", topic)
            self.committed_samples.append((time.time(), committed))
            if committed >= n:
                return first or time.time(), time.time()
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {n} committed records on {topic}")

    def stop(self):
        hwm = rss_kb(self.proc.pid, "VmHWM")
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        return hwm


def run_peer(broker, topic, n):
    dsn = fresh_db("peer")
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "peers", "seed_consumer.py"), broker, topic, str(n), dsn],
                         capture_output=True, text=True, timeout=1800)
    m = re.search(r"= (\d+) events/s", out.stdout)
    if not m:
        raise RuntimeError(f"peer failed: {out.stdout}{out.stderr}")
    return {"events": n, "events_per_s": int(m.group(1))}


def produce_orders_avro(broker, topic, n, registry):
    t0 = time.time()
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "gen_orders_avro.py"), broker, topic, str(n), registry],
                         capture_output=True, text=True, check=True)
    log(f"produced {n} Avro envelopes to {topic} in {time.time() - t0:.1f}s ({out.stdout.strip()})")


def avro_settings(registry):
    return {"CDC_LAKE__KAFKA__FORMAT": "avro", "CDC_LAKE__KAFKA__SCHEMA_REGISTRY__URLS": f"['{registry}']"}


# The lake's plain layout (files and manifest, no Delta log), against which Delta's cost is measured.
PLAIN_PARQUET = {"CDC_LAKE__LAKE__TABLE_FORMAT": "parquet"}


def run_ingest(binary, broker, topic, n, sinks, extra=None, profile=None):
    """One pod on `topic` until it has committed `n` records; `profile` names a perf.data file
    to record the run into."""
    dsn = fresh_db("_".join(sinks))
    pod = Pod(binary, broker, topic, dsn, sinks, extra)
    perf = perf_attach(pod.proc.pid, profile)
    t0, t1 = pod.wait_committed(topic, n)
    perf_detach(perf)
    peak = pod.stop()
    result = {"sinks": list(sinks), "events": n, "seconds": round(t1 - t0, 3),
              "events_per_s": round(n / (t1 - t0)), "steady_events_per_s": pod.steady_rate(n),
              "peak_rss_mb": round(peak / 1024, 1), "dsn": dsn, "lake": pod.lake}
    if profile:
        result["hot_spots"] = hot_spots(profile)
    log(f"cdc-lake {'+'.join(sinks)}: {result['events_per_s']} events/s ({n} in {result['seconds']}s; "
        f"{result['steady_events_per_s']} events/s from 10% to 90% committed), peak RSS {result['peak_rss_mb']} MB")
    return result


def perf_attach(pid, path):
    if not path:
        return None
    return subprocess.Popen(["perf", "record", "-F", "199", "-g", "-o", path, "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_detach(perf):
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)


def check_counts(result, n):
    """Correctness of an all-sinks run: every record once in raw and lake; mirror = raw's last state."""
    dsn = result["dsn"]
    raw = query1(dsn, "SELECT count(*) FROM cdc_raw.cdc_events")
    raw_distinct = query1(dsn, "SELECT count(DISTINCT (kafka_topic, kafka_partition, kafka_offset)) FROM cdc_raw.cdc_events")
    alive = query1(dsn, """SELECT count(*) FROM (SELECT DISTINCT ON (event_key) operation FROM cdc_raw.cdc_events
                           ORDER BY event_key, kafka_offset DESC) last WHERE operation <> 'd'""")
    mirror = query1(dsn, "SELECT count(*) FROM cdc_processed.orders")
    import pyarrow.dataset as ds
    lake_rows = ds.dataset(os.path.join(result["lake"], "cdc_events"), format="parquet").count_rows()
    counts = {"raw": raw, "raw_distinct": raw_distinct, "mirror": mirror, "mirror_expected": alive, "lake_rows": lake_rows}
    ok = raw == n and raw_distinct == n and mirror == alive and lake_rows == n
    return ok, counts


def delta_rows(lake):
    """Rows of every Delta table of a lake, through the Delta log (the deltalake package)."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "lake_check.py"), "--dir", lake],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out).get("delta", {}).get("rows", 0)


def copy_ceiling(binary, result, n):
    """psql \\copy of the same raw rows into an identical table (same migrations)."""
    src = result["dsn"]
    dst = fresh_db("copy")
    subprocess.run([binary, "migrate"], env={**os.environ, "CDC_LAKE__POSTGRES__URL": dst, "CDC_LAKE__TARGETS": "{}"}, check=True, capture_output=True)
    path = tempfile.mktemp(suffix=".copy")
    subprocess.run(["psql", src, "-qc", f"\\copy cdc_raw.cdc_events TO '{path}'"], check=True)
    t0 = time.time()
    subprocess.run(["psql", dst, "-qc", f"\\copy cdc_raw.cdc_events FROM '{path}'"], check=True)
    secs = time.time() - t0
    os.unlink(path)
    rate = round(n / secs)
    log(f"COPY ceiling: {rate} rows/s ({n} rows in {secs:.2f}s)")
    return {"rows": n, "seconds": round(secs, 3), "rows_per_s": rate}


def example(binary, name):
    return os.path.join(os.path.dirname(binary), "examples", name)


def broker_read_ceiling(binary, broker, topic, n):
    """A bare librdkafka consumer draining the topic (examples/broker_read_ceiling)."""
    out = subprocess.run([example(binary, "broker_read_ceiling"), broker, topic, str(n)],
                         check=True, capture_output=True, text=True, timeout=900).stdout
    r = json.loads(out)
    r = {"records": r["records"], "seconds": round(r["seconds"], 3), "records_per_s": round(r["records_per_s"]),
         "mb_per_s": round(r["bytes"] / max(r["seconds"], 1e-9) / 1e6, 1)}
    log(f"broker read ceiling: {r['records_per_s']} records/s ({r['mb_per_s']} MB/s)")
    return r


def parquet_encode_ceiling(binary, lake, seconds):
    """arrow-rs writing the rows of a finished lake from memory (examples/parquet_encode_ceiling)."""
    out = subprocess.run([example(binary, "parquet_encode_ceiling"), lake, str(seconds)],
                         check=True, capture_output=True, text=True, timeout=900).stdout
    r = json.loads(out)
    r = {"rows": r["rows"], "files": r["files"], "seconds": round(r["seconds"], 3), "rows_per_s": round(r["rows_per_s"])}
    log(f"Parquet encode ceiling: {r['rows_per_s']} rows/s ({r['files']} files of the lake-alone run)")
    return r


def replay_env(result, schema):
    """The environment of `cdc-lake replay --target bench` over a finished run's raw log and lake,
    rebuilding into `schema` (a replay-only target, not applied live)."""
    return {**os.environ, "CDC_LAKE__POSTGRES__URL": result["dsn"], "CDC_LAKE__LAKE__ROOT": result["lake"],
            "CDC_LAKE__KAFKA__BROKERS": "unused:9092", "CDC_LAKE__TARGETS": "{}",
            "CDC_LAKE__TARGETS__BENCH__SCHEMA": schema, "CDC_LAKE__TARGETS__BENCH__ENABLED": "false",
            "RUST_LOG": "warn"}


def replay(binary, result, n, source):
    """cdc-lake replay --rebuild of the all-sinks run into a replay-only target, from the raw log
    or the lake; checks the rebuilt mirror has the live mirror's rows."""
    env = replay_env(result, f"replay_{source}")
    t0 = time.time()
    out = subprocess.run([binary, "replay", "--target", "bench", "--rebuild", "--source", source],
                         env=env, capture_output=True, text=True, timeout=1800)
    secs = time.time() - t0
    if out.returncode != 0:
        raise RuntimeError(f"replay --source {source} failed: {out.stderr}")
    m = re.search(r"replayed (\d+) changes", out.stdout)
    events = int(m.group(1)) if m else 0
    rows = query1(result["dsn"], f"SELECT count(*) FROM replay_{source}.orders")
    live = query1(result["dsn"], "SELECT count(*) FROM cdc_processed.orders")
    r = {"source": source, "events": events, "seconds": round(secs, 3), "events_per_s": round(events / secs),
         "rows_match": rows == live and events == n}
    log(f"replay from {source}: {r['events_per_s']} events/s ({events} in {r['seconds']}s, process start to exit), rows match: {r['rows_match']}")
    return r


def latency(binary, broker, rate, seconds):
    """Offered load at a fixed rate; latency = cdc_synced_at (clock_timestamp() at apply) minus
    the produce time carried in the envelope."""
    topic = f"bench-lat-{uuid.uuid4().hex[:6]}.public.orders"
    dsn = fresh_db("latency")
    p = Producer({"bootstrap.servers": broker, "linger.ms": 5})

    def envelope(oid, lsn):
        now = int(time.time() * 1000)
        return json.dumps({"before": None, "after": {"id": oid, "user_id": "u", "total": 1.0, "status": "CONFIRMED",
                                                      "created_at": now},
                           "source": {"connector": "postgresql", "name": "bench", "ts_ms": now, "snapshot": "false",
                                      "db": "ecomdb", "schema": "public", "table": "orders", "txId": lsn, "lsn": lsn},
                           "transaction": None, "op": "c", "ts_ms": now})

    warm = str(uuid.uuid4())
    p.produce(topic, key=json.dumps({"id": warm}), value=envelope(warm, 1), partition=0)
    p.flush(10)
    pod = Pod(binary, broker, topic, dsn)
    pod.wait_committed(topic, 1, timeout=120)
    steady_rss = [0]
    total = int(rate * seconds)
    log(f"latency: offering {rate} events/s for {seconds}s")
    t0 = time.time()
    tick = 0.01
    for i in range(total):
        oid = str(uuid.uuid4())
        p.produce(topic, key=json.dumps({"id": oid}), value=envelope(oid, 100 + i), partition=0)
        if i % int(rate * tick) == 0:
            p.poll(0)
            ahead = t0 + i / rate - time.time()
            if ahead > 0:
                time.sleep(ahead)
            steady_rss[0] = max(steady_rss[0], rss_kb(pod.proc.pid, "VmRSS"))
    p.flush(30)
    pod.wait_committed(topic, total + 1, timeout=300)
    conn = psycopg2.connect(dsn)
    cur = conn.cursor()
    cur.execute("""SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
                          max(ms), count(*)
                   FROM (SELECT extract(epoch FROM cdc_synced_at - to_timestamp(created_at / 1000.0)) * 1000 AS ms
                         FROM cdc_processed.orders WHERE id <> %s) x""", (warm,))
    p50, p99, mx, count = cur.fetchone()
    conn.close()
    pod.stop()
    res = {"offered_per_s": rate, "seconds": seconds, "events": count, "p50_ms": round(p50), "p99_ms": round(p99),
           "max_ms": round(mx), "steady_rss_mb": round(steady_rss[0] / 1024, 1)}
    log(f"latency at {rate}/s: p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, max {res['max_ms']} ms; steady RSS {res['steady_rss_mb']} MB")
    return res


def backlog(binary, broker, topic, n, profile=None, extra=None):
    """All sinks on a backlog of `n` events already in `topic`: throughput and peak RSS."""
    dsn = fresh_db("backlog")
    pod = Pod(binary, broker, topic, dsn, extra=extra)
    perf = perf_attach(pod.proc.pid, profile)
    t0, t1 = pod.wait_committed(topic, n)
    perf_detach(perf)
    peak = pod.stop()
    res = {"events": n, "seconds": round(t1 - t0, 2), "events_per_s": round(n / (t1 - t0)), "peak_rss_mb": round(peak / 1024, 1)}
    if profile:
        res["hot_spots"] = hot_spots(profile)
    log(f"backlog of {n}{' ' + str(extra) if extra else ''}: {res['events_per_s']} events/s, peak RSS {res['peak_rss_mb']} MB")
    return res


def thousands(x):
    """A figure with thousands separators; n/a for one a short run could not give."""
    return f"{x:,}" if x else "n/a"


def hot_spots(data, top=15):
    """The top self-time symbols of a perf.data file."""
    if not os.path.exists(data):
        return []
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "symbol",
                          "--percent-limit", "1"], capture_output=True, text=True)
    spots = []
    for line in out.stdout.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+\[\.\]\s+(.*)", line)
        if m:
            spots.append({"percent": float(m.group(1)), "symbol": m.group(2).strip()[:120].rstrip()})
    return spots[:top]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", required=True)
    ap.add_argument("--bin", required=True, help="the cdc-lake binary")
    ap.add_argument("--events", type=int, default=500_000, help="events for the throughput runs")
    ap.add_argument("--peer-events", type=int, default=20_000, help="events for the peer (it runs ~1k/s)")
    ap.add_argument("--latency-rate", type=int, default=10_000, help="offered events/s for the latency run")
    ap.add_argument("--latency-seconds", type=int, default=20)
    ap.add_argument("--backlog", type=int, default=1_000_000, help="events for the memory run (0 skips)")
    ap.add_argument("--profile", action="store_true",
                    help="perf-record each single-sink run and the backlog run, and list their hot spots")
    ap.add_argument("--smoke", action="store_true", help="small run for CI: completes and counts match")
    ap.add_argument("--registry", help="Schema Registry URL: adds the all-sinks run on the same workload in Avro")
    ap.add_argument("--peers", default="python", choices=["python", "flink"],
                    help="python: the seeds' consumer only (default); flink: also the seeds' Flink SQL job "
                         "(installs PyFlink on first use, about a minute)")
    ap.add_argument("--scaling-events", type=int, default=20_000,
                    help="events per point of the scaling curves (0 skips them)")
    ap.add_argument("--out", default=os.path.join(REPO, "results"))
    a = ap.parse_args()
    if a.smoke:
        a.events, a.peer_events, a.latency_rate, a.latency_seconds, a.backlog = 5000, 500, 500, 3, 0
        a.scaling_events = min(a.scaling_events, 1000)

    drop_bench_dbs()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = os.path.join(a.out, f"bench-{stamp}{'-smoke' if a.smoke else ''}")
    os.makedirs(out_dir, exist_ok=True)
    report = {"machine": {"cores": os.cpu_count(), "kernel": os.uname().release, "time": stamp}, "smoke": a.smoke}

    topic = f"bench-main-{uuid.uuid4().hex[:6]}.public.orders"
    produce_orders(a.broker, topic, a.events)
    log(f"peer: seed_consumer.py on {a.peer_events} events")
    report["peer"] = run_peer(a.broker, topic, a.peer_events)
    log(f"peer: {report['peer']['events_per_s']} events/s")

    runs = {}
    def profile(name):
        return os.path.join(out_dir, f"perf-{name}.data") if a.profile else None

    for sinks in [("raw", "lake", "state"), ("raw",), ("state",)]:
        runs["+".join(sinks)] = run_ingest(a.bin, a.broker, topic, a.events, sinks,
                                           profile=profile(sinks[0]) if len(sinks) == 1 else None)
    # The lake alone as plain Parquet and as Delta tables (the default): what the Delta commits
    # cost, read back through the Delta log (every event once).
    runs["lake"] = run_ingest(a.bin, a.broker, topic, a.events, ("lake",), PLAIN_PARQUET, profile=profile("lake"))
    runs["lake_delta"] = run_ingest(a.bin, a.broker, topic, a.events, ("lake",),
                                    {"CDC_LAKE__LAKE__TABLE_FORMAT": "delta"})
    ok, counts = check_counts(runs["raw+lake+state"], a.events)
    counts["lake_delta_rows"] = delta_rows(runs["lake_delta"]["lake"])
    ok = ok and counts["lake_delta_rows"] == a.events
    # Issue 18: the all-sinks run with ten filters routing to ten topics.
    runs["raw+lake+state+route"] = bench_routing.run(sys.modules[__name__], a.bin, a.broker, topic, a.events,
                                                     out_dir, runs["raw+lake+state"])
    counts["routing"] = runs["raw+lake+state+route"]["filters"]
    ok = ok and runs["raw+lake+state+route"]["counts_ok"]
    report["counts"] = counts
    if a.registry:
        avro_topic = f"bench-avro-{uuid.uuid4().hex[:6]}.public.orders"
        produce_orders_avro(a.broker, avro_topic, a.events, a.registry)
        runs["avro"] = run_ingest(a.bin, a.broker, avro_topic, a.events, ("raw", "lake", "state"),
                                  avro_settings(a.registry))
        avro_ok, report["avro_counts"] = check_counts(runs["avro"], a.events)
        ok = ok and avro_ok
        counts = {"json": counts, "avro": report["avro_counts"]}
    report["copy_ceiling"] = copy_ceiling(a.bin, runs["raw+lake+state"], a.events)
    report["broker_read_ceiling"] = broker_read_ceiling(a.bin, a.broker, topic, a.events)
    report["parquet_encode_ceiling"] = parquet_encode_ceiling(a.bin, runs["lake"]["lake"], 1 if a.smoke else 3)
    if a.peers == "flink":
        flink_topic = f"bench-flink-{uuid.uuid4().hex[:6]}.public.orders"
        subprocess.run([sys.executable, os.path.join(TOOLS, "peers", "gen_orders.py"), a.broker, flink_topic,
                        str(a.events), "full"], check=True, capture_output=True)
        report["flink"] = bench_flink.run(sys.modules[__name__], a.broker, flink_topic, a.events)
        runs["state_flink_topic"] = run_ingest(a.bin, a.broker, flink_topic, a.events, ("state",))
        runs["all_flink_topic"] = run_ingest(a.bin, a.broker, flink_topic, a.events, ("raw", "lake", "state"))
        # Both mirrors against the fold of the topic's records the Flink oracle made.
        for name in ("state_flink_topic", "all_flink_topic"):
            rows = query1(runs[name]["dsn"], "SELECT count(*) FROM cdc_processed.orders")
            runs[name]["rows_match"] = rows == report["flink"]["rows_expected"]
            ok = ok and runs[name]["rows_match"]
        ok = ok and report["flink"]["rows_match"]
    report["replay"] = {src: replay(a.bin, runs["raw+lake+state"], a.events, src) for src in ("raw", "lake")}
    ok = ok and all(r["rows_match"] for r in report["replay"].values())
    if a.scaling_events:
        report["scaling"] = bench_scaling.run(sys.modules[__name__], a.bin, a.broker, a.scaling_events,
                                              runs["raw+lake+state"])
        bench_scaling.plot(report["scaling"], os.path.join(out_dir, "scaling.png"))
        ok = ok and report["scaling"]["counts_ok"]
    report["counts_ok"] = ok
    for r in runs.values():
        r.pop("dsn")
        r.pop("lake")
    report["ingest"] = runs
    report["decode"] = decode_alone(a.bin, 1 if a.smoke else 3)
    report["latency"] = latency(a.bin, a.broker, a.latency_rate, a.latency_seconds)
    if a.backlog:
        backlog_topic = f"bench-backlog-{uuid.uuid4().hex[:6]}.public.orders"
        produce_orders(a.broker, backlog_topic, a.backlog)
        report["backlog"] = backlog(a.bin, a.broker, backlog_topic, a.backlog, profile("backlog"),
                                    extra=PLAIN_PARQUET)
        # The same backlog with the lake as Delta tables: the Delta log's snapshot must not grow
        # the pod's memory with the commits (kafka-delta-ingest#227).
        report["backlog_delta"] = backlog(a.bin, a.broker, backlog_topic, a.backlog,
                                          extra={"CDC_LAKE__LAKE__TABLE_FORMAT": "delta"})

    report["ratios"] = ratios(report)
    report["targets"] = targets(report)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_md(report))
    print(render_md(report))
    log(f"report: {out_dir}/report.md")
    if not ok:
        log(f"COUNTS DO NOT MATCH: {counts}")
        sys.exit(1)


def decode_alone(binary, seconds):
    """Decoding alone, per wire format, on the same real Debezium changes (the committed zoo
    captures): examples/decode_throughput."""
    out = subprocess.run([example(binary, "decode_throughput"), str(seconds)], check=True, capture_output=True, text=True).stdout
    rates = json.loads(out)
    log("decoding alone: " + ", ".join(f"{k} {v['changes_per_s']:,.0f} changes/s" for k, v in rates.items()))
    return rates


def ratios(r):
    """Every headline figure against its peer or ceiling."""
    i = r["ingest"]
    all_sinks = i["raw+lake+state"]["events_per_s"]
    out = {
        "all_sinks_vs_peer": round(all_sinks / r["peer"]["events_per_s"], 1),
        "all_sinks_vs_broker_read_ceiling": round(all_sinks / r["broker_read_ceiling"]["records_per_s"], 3),
        "raw_only_vs_copy_ceiling": round(i["raw"]["events_per_s"] / r["copy_ceiling"]["rows_per_s"], 3),
        "lake_vs_parquet_encode_ceiling": round(i["lake"]["events_per_s"] / r["parquet_encode_ceiling"]["rows_per_s"], 3),
        "lake_vs_broker_read_ceiling": round(i["lake"]["events_per_s"] / r["broker_read_ceiling"]["records_per_s"], 3),
        "lake_delta_vs_parquet": round(i["lake_delta"]["events_per_s"] / i["lake"]["events_per_s"], 2),
        "all_sinks_with_10_routes_vs_without": i["raw+lake+state+route"]["vs_without_routing"],
    }
    if "avro" in i:
        out["avro_vs_json_all_sinks"] = round(i["avro"]["events_per_s"] / all_sinks, 2)
    if "flink" in r:
        out["mirror_vs_flink"] = round(i["state_flink_topic"]["events_per_s"] / r["flink"]["events_per_s"], 2)
        out["all_sinks_vs_flink"] = round(i["all_flink_topic"]["events_per_s"] / r["flink"]["events_per_s"], 2)
    return out


# Issue 17's targets: (name, measure, target, higher is better).
def targets(r):
    i = r["ingest"]
    rows = [
        ("all three sinks", i["raw+lake+state"]["events_per_s"], 50_000, "events/s"),
        ("raw log alone, share of the COPY ceiling", r["ratios"]["raw_only_vs_copy_ceiling"], 0.8, "ratio"),
        ("mirror alone", i["state"]["events_per_s"], 60_000, "events/s"),
        ("lake alone (Parquet)", i["lake"]["events_per_s"], 150_000, "events/s"),
        ("replay from the raw log", r["replay"]["raw"]["events_per_s"], 100_000, "events/s"),
        ("replay from the lake", r["replay"]["lake"]["events_per_s"], 100_000, "events/s"),
        (f"p99 produce-to-visible at {r['latency']['offered_per_s']:,}/s", r["latency"]["p99_ms"], 150, "ms, at most"),
    ]
    if "backlog" in r:
        rows.append((f"peak RSS, {r['backlog']['events']:,}-event backlog, all sinks", r["backlog"]["peak_rss_mb"], 200,
                     "MB, at most"))
    out = []
    for name, value, target, unit in rows:
        at_most = unit.endswith("at most")
        met = value <= target if at_most else value >= target
        out.append({"target": name, "value": value, "goal": target, "unit": unit, "met": met,
                    "share_of_goal": round(value / target, 2)})
    return out


def render_md(r):
    i = r["ingest"]
    lines = [
        f"# cdc-lake benchmark {r['machine']['time']}{' (smoke)' if r['smoke'] else ''}",
        "",
        f"Machine: {r['machine']['cores']} cores, kernel {r['machine']['kernel']}; PostgreSQL, broker and pod on the same host.",
        "",
        "| measure | result | ratio |",
        "|---|---|---|",
        f"| peer (seed_consumer.py, {r['peer']['events']} events) | {r['peer']['events_per_s']:,} events/s | 1.0× |",
        f"| cdc-lake raw + lake + mirror | {i['raw+lake+state']['events_per_s']:,} events/s | {r['ratios']['all_sinks_vs_peer']}× peer, "
        f"{r['ratios']['all_sinks_vs_broker_read_ceiling']:.0%} of the broker read ceiling |",
    ]
    if "flink" in r:
        f = r["flink"]
        lines += [
            f"| peer: the seeds' Flink SQL job, max-rows={f['max_rows']} ({f['events']:,} events, REPLICA IDENTITY FULL topic), "
            f"best of {len(f['rounds_events_per_s'])} rounds ({' / '.join(f'{x:,}' for x in f['rounds_events_per_s'])}) | "
            f"{f['events_per_s']:,} events/s after a {f['job_start_s']} s job start | 1.0× |",
            f"| cdc-lake mirror alone, the same topic | {i['state_flink_topic']['events_per_s']:,} events/s | {r['ratios']['mirror_vs_flink']}× Flink |",
            f"| cdc-lake raw + lake + mirror, the same topic | {i['all_flink_topic']['events_per_s']:,} events/s | {r['ratios']['all_sinks_vs_flink']}× Flink |",
        ]
    if "avro" in i:
        lines.append(f"| cdc-lake raw + lake + mirror, Avro with the registry | {i['avro']['events_per_s']:,} events/s | "
                     f"{r['ratios']['avro_vs_json_all_sinks']}× the JSON run |")
    lines += [
        f"| cdc-lake raw log alone | {i['raw']['events_per_s']:,} events/s | {r['ratios']['raw_only_vs_copy_ceiling']:.0%} of COPY ceiling |",
        f"| cdc-lake mirror alone | {i['state']['events_per_s']:,} events/s | |",
        f"| cdc-lake lake alone | {i['lake']['events_per_s']:,} events/s ({thousands(i['lake']['steady_events_per_s'])} from 10% to 90% committed, "
        f"without the last roll's wait for lake.roll_age) | {r['ratios']['lake_vs_parquet_encode_ceiling']:.0%} of the Parquet encode ceiling, "
        f"{r['ratios']['lake_vs_broker_read_ceiling']:.0%} of the broker read ceiling |",
        f"| cdc-lake lake alone, Delta tables | {i['lake_delta']['events_per_s']:,} events/s, peak RSS {i['lake_delta']['peak_rss_mb']} MB | "
        f"{r['ratios']['lake_delta_vs_parquet']}× plain Parquet |",
        f"| COPY ceiling (psql \\copy of the same rows) | {r['copy_ceiling']['rows_per_s']:,} rows/s | |",
        f"| broker read ceiling (bare librdkafka consumer, same topic) | {r['broker_read_ceiling']['records_per_s']:,} records/s "
        f"({r['broker_read_ceiling']['mb_per_s']} MB/s) | |",
        f"| Parquet encode ceiling (arrow-rs, the lake-alone run's rows from memory) | {r['parquet_encode_ceiling']['rows_per_s']:,} rows/s | |",
        f"| cdc-replay --rebuild from the raw log | {r['replay']['raw']['events_per_s']:,} events/s | {r['replay']['raw']['events_per_s'] / r['peer']['events_per_s']:.1f}× peer ingest |",
        f"| cdc-replay --rebuild from the lake | {r['replay']['lake']['events_per_s']:,} events/s | |",
        f"| latency at {r['latency']['offered_per_s']:,}/s: p50 / p99 / max | {r['latency']['p50_ms']} / {r['latency']['p99_ms']} / {r['latency']['max_ms']} ms | |",
        f"| RSS at steady state | {r['latency']['steady_rss_mb']} MB | |",
    ]
    d = r.get("decode")
    if d:
        lines.append(f"| decoding alone, the zoo's changes: schemaless JSON / `{{schema, payload}}` JSON / Avro | "
                     f"{d['json']['changes_per_s']:,.0f} / {d['json_with_schema']['changes_per_s']:,.0f} / "
                     f"{d['avro']['changes_per_s']:,.0f} changes/s | Avro "
                     f"{d['avro']['changes_per_s'] / d['json_with_schema']['changes_per_s']:.1f}× the typed JSON |")
    if "backlog" in r:
        b = r["backlog"]
        lines.append(f"| peak RSS, {b['events']:,}-event backlog | {b['peak_rss_mb']} MB ({b['events_per_s']:,} events/s) | |")
    if "backlog_delta" in r:
        b = r["backlog_delta"]
        lines.append(f"| peak RSS, {b['events']:,}-event backlog, Delta tables | {b['peak_rss_mb']} MB ({b['events_per_s']:,} events/s) | "
                     f"{round(b['peak_rss_mb'] / r['backlog']['peak_rss_mb'], 2)}× plain Parquet |")
    lines += ["", f"Throughput runs: {i['raw']['events']:,} events each. Counts check: {'ok' if r['counts_ok'] else 'FAILED'} {r['counts']}."]
    if "raw+lake+state+route" in i:
        lines += bench_routing.render(r)
    lines += ["", "## Targets (issue 17)", "", "| target | measured | goal | share of goal | |", "|---|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']:,} | {t['goal']:,} {t['unit']} | {t['share_of_goal']}× | {'met' if t['met'] else 'missed'} |"
              for t in r["targets"]]
    if "scaling" in r:
        lines.append(bench_scaling.render_md(r["scaling"]))
        lines.append("![how cost grows](scaling.png)")
    profiled = [(f"{name} alone", run) for name, run in (("raw log", i["raw"]), ("mirror", i["state"]), ("lake", i["lake"]))]
    profiled.append(("backlog, all sinks", r.get("backlog", {})))
    for name, run in profiled:
        if run.get("hot_spots"):
            lines += ["", f"## Hot spots: {name} (perf, self time)", "", "| % | symbol |", "|---|---|"]
            lines += [f"| {h['percent']} | `{h['symbol']}` |" for h in run["hot_spots"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
