"""cdc-lake fault suite (run through tools/faults).

Streams bookstore order envelopes into a 4-partition topic at a steady rate while it breaks the
pipeline, then checks every sink against the broker's records:
  - raw log: every (topic, partition, offset) exactly once, in cdc_events or (poison) cdc_rejects;
  - lake (S3 API server): each offset in exactly one file, manifest ranges contiguous per
    partition, nothing outside the manifest, no zero-byte object, no pending upload;
  - mirror: cdc_processed.orders equals a reference model folded from the broker's records;
  - checkpoints: sampled every 0.3 s, never move backwards.

Faults, in order: kill -9 of the pod at random moments (--kills), while `cdc-lake lake compact`
runs beside it over and over, most runs SIGKILLed at a random moment; pg_terminate_backend of the
pod's connections; a restart of the sink PostgreSQL; a broker outage; the S3 API server
unresponsive (SIGSTOP) for --s3-outage seconds while readiness and the raw sink are watched;
a second pod joining the group then one pod killed; a poison storm of 1000 malformed records in
a row; a data-fault storm (every record class that used to wedge a sink: names that collide with
internal ones, a widened key, 1,700 columns, an unindexable key, NUL in values and table names,
timestamps outside PostgreSQL's range, a 64-byte column name, path-unsafe table names),
interleaved with good records on every partition, then SIGTERM and kill -9 while the raw sink
is failing on one record; SIGTERM under load (must exit within 10 s); with --backlog, a fresh
pod on a backlog of N events (peak RSS, group stability). After the last fault one compaction
runs to the end (retention 0 s), so the checks read a compacted, vacuumed lake.

After a kill -9 the replacement pod joins a fresh consumer group under the same checkpoint name
(kafka.checkpoint_name): it resumes from the sinks' checkpoints and never waits for the dead
member to leave the broker's group.

Writes results/faults-<time>/report.{json,md}; exits 1 when any check fails.
"""
import argparse
import datetime
import json
import os
import random
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
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench import free_port, metric_sum, metrics, rss_kb  # the bench's helpers, same directory

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
PG_BASE = os.environ.get("FAULTS_PG", "postgres://postgres@127.0.0.1:5432")
RUN = os.environ.get("CDC_LAKE_RUN", "/tmp/cdc-lake-run")
# The lake's default format, Delta tables; CDC_LAKE_FAULTS_FORMAT=parquet runs the plain layout.
# Tables with escaped directory names get no Delta log (DeltaLog::covers) and are checked
# through the manifest only.
DELTA = os.environ.get("CDC_LAKE_FAULTS_FORMAT", "delta") == "delta"
PARTITIONS = 4


def log(msg):
    print(f"[faults {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def query(dsn, sql, args=None):
    for attempt in range(60):
        try:
            with psycopg2.connect(dsn) as c, c.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        except psycopg2.OperationalError:
            if attempt == 59:
                raise
            time.sleep(0.5)  # PostgreSQL restarting


def admin_sql(sql):
    """Statements that cannot run in a transaction (CREATE/DROP DATABASE)."""
    c = psycopg2.connect(f"{PG_BASE}/postgres")
    c.autocommit = True
    try:
        c.cursor().execute(sql)
    finally:
        c.close()


class Stream:
    """Order envelopes at a steady rate: creates, updates and deletes of random keys, LSNs
    increasing. pause()/resume() let the poison storm put its records in a row."""

    def __init__(self, broker, topic, total, rate):
        self.topic, self.total, self.rate = topic, total, rate
        self.producer = Producer({"bootstrap.servers": broker, "linger.ms": 5, "message.timeout.ms": 300000})
        self.sent = 0
        self.delivered = 0  # acknowledged by the broker (tansu's watermarks lag, so count here)
        self.finish = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.rng = random.Random(11)
        self.ids = []
        self.lsn = 50_000_000
        self.thread = threading.Thread(target=self.run, daemon=True)

    def envelope(self, i):
        rng, now = self.rng, 1795000000000 + i
        self.lsn += 100
        r = rng.random()
        if self.ids and r < 0.07:
            oid = self.ids.pop(rng.randrange(len(self.ids)))
            op, before, after = "d", {"id": oid, "user_id": None, "total": None, "status": None, "created_at": None}, None
        elif self.ids and r < 0.40:
            oid = rng.choice(self.ids)
            op, before = "u", None
            after = {"id": oid, "user_id": f"u{i}", "total": round(rng.random() * 100, 2),
                     "status": rng.choice(["SHIPPED", "DELIVERED", "CANCELLED"]), "created_at": now}
        else:
            oid = str(uuid.UUID(int=rng.getrandbits(128)))
            self.ids.append(oid)
            op, before = "c", None
            after = {"id": oid, "user_id": f"u{i}", "total": round(rng.random() * 100, 2), "status": "CONFIRMED", "created_at": now}
        value = {"before": before, "after": after,
                 "source": {"version": "3.6.3.Final", "connector": "postgresql", "name": "faults", "ts_ms": now,
                            "snapshot": "false", "db": "ecomdb", "schema": "public", "table": "orders",
                            "txId": 1000 + i, "lsn": self.lsn, "sequence": json.dumps([str(self.lsn), str(self.lsn)])},
                 "transaction": None, "op": op, "ts_ms": now + 3}
        return json.dumps({"id": oid}), json.dumps(value)

    def run(self):
        t0, i = time.time(), 0
        while i < self.total or not self.finish.is_set():
            i += 1
            self.gate.wait()
            key, value = self.envelope(i)
            while True:
                try:
                    self.producer.produce(self.topic, key=key, value=value, on_delivery=self.on_delivery)
                    break
                except BufferError:
                    self.producer.poll(0.1)
            self.sent += 1
            if i % 200 == 0:
                self.producer.poll(0)
                ahead = self.sent / self.rate - (time.time() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        self.producer.flush(120)

    def on_delivery(self, err, _msg):
        if err is None:
            self.delivered += 1

    def poison(self, n, partition):
        self.gate.clear()
        self.producer.flush(60)
        for i in range(n):
            self.producer.produce(self.topic, key=b"poison", value=b"{not json %d" % i, partition=partition,
                                  on_delivery=self.on_delivery)
        self.producer.flush(60)
        self.gate.set()


def df_envelope(table, after, lsn, ts_ms=1795000000000):
    schema, name = table.split(".", 1) if "." in table and not table.startswith(".") else ("public", table)
    value = {"before": None, "after": after,
             "source": {"version": "3.6.3.Final", "connector": "postgresql", "name": "faults", "ts_ms": ts_ms,
                        "snapshot": "false", "db": "ecomdb", "schema": schema, "table": name, "txId": 1,
                        "lsn": lsn, "sequence": json.dumps([str(lsn), str(lsn)])},
             "transaction": None, "op": "c", "ts_ms": ts_ms}
    return json.dumps(value)


def incompressible(rng, n):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def data_fault_records(rounds, rng):
    """The data-fault storm: per round, one record of every class, each with its own key, as
    (partition, key, value, kafka timestamp or None, table, state outcome). The state outcome
    is "stored" (in cdc_processed.<table>) or "rejected"; `raw_rejected` marks the records the
    raw log must reject with their exact bytes. Records of one table that depend on order (the
    widened key) share partition 0."""
    out = []
    lsn = 90_000_000
    wide = {f"c{i}": i for i in range(1700)}

    def add(partition, key, table, after, state, raw_rejected=False, ts=None, src_ts=1795000000000):
        nonlocal lsn
        lsn += 10
        out.append({"partition": partition, "key": json.dumps(key), "value": df_envelope(table, after, lsn, src_ts),
                    "timestamp": ts, "table": table, "state": state, "raw_rejected": raw_rejected})

    add(0, {"id": 0}, "df_widen", {"id": 0, "t": "a"}, "stored")
    for r in range(rounds):
        k = r + 1
        p = r % PARTITIONS
        q = (r + 1) % PARTITIONS
        add(p, {"id": k}, "df_good", {"id": k, "v": "a"}, "stored")
        add(q, {"id": k}, "df_wcol", {"id": k, "w_lsn": 5, "w_commit_lsn": 6, "_cdc_op": "x"}, "stored")
        add(p, {"cdc_operation": f"k{k}"}, "df_metakey", {"id": k}, "rejected")
        add(0, {"id": k, "t": "b"}, "df_widen", {"id": k, "t": "b"}, "rejected")
        add(q, {"id": k}, "df_wide", {"id": k, **wide}, "rejected")
        big = incompressible(rng, 3000)
        add(p, {"k": big}, "df_bigkey", {"k": big}, "rejected")
        add(q, {"id": k}, "df_nul", {"id": k, "v": "a\x00b"}, "rejected", raw_rejected=True)
        add(p, {"id": k}, "df_nul\x00t", {"id": k}, "rejected", raw_rejected=True)
        add(q, {"id": k}, "df_oldsrc", {"id": k}, "stored", src_ts=-250_000_000_000_000)
        add(p, {"id": k}, "df_oldkafka", {"id": k}, "stored", raw_rejected=True, ts=-250_000_000_000_000)
        add(q, {"id": k}, "df_longcol", {"id": k, "x" * 64: 1}, "rejected")
        add(q, {"id": 1000 + k}, "df_longcol", {"id": 1000 + k, "v": 1}, "stored")
        for unsafe in ("..", "a/b", "x=y"):
            add(p, {"id": k}, unsafe, {"id": k}, "stored")
    return out


class Pod:
    """The cdc-lake binary as a child process."""

    def __init__(self, args, env, name):
        self.port = free_port()
        self.env = {**env, "CDC_LAKE__HTTP__LISTEN": f"127.0.0.1:{self.port}"}
        self.bin, self.name = args.bin, name
        self.logpath = os.path.join(args.out_dir, f"pod-{name}.log")
        self.proc = None
        self.peak_kb = 0
        self.start()

    def start(self):
        logf = open(self.logpath, "a")
        self.proc = subprocess.Popen([self.bin, "ingest"], env=self.env, stdout=logf, stderr=logf)

    def sample_rss(self):
        if self.proc and self.proc.poll() is None:
            self.peak_kb = max(self.peak_kb, rss_kb(self.proc.pid, "VmHWM"))

    def kill9(self):
        self.sample_rss()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def sigterm(self):
        self.sample_rss()
        t0 = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return 999.0
        return time.time() - t0

    def exit_code(self):
        return self.proc.returncode

    def sink_errors(self):
        return metric_sum(metrics(self.port), "cdc_lake_sink_errors_total")

    def fresh_group(self):
        """A new consumer group under the same checkpoint name (after a kill -9)."""
        self.env["CDC_LAKE__KAFKA__GROUP_ID"] = f"faults-{uuid.uuid4().hex[:8]}"

    def written(self):
        return metric_sum(metrics(self.port), "cdc_lake_records_written_total")

    def wait_progress(self, timeout=60):
        """Until this process writes more than it has so far (it recovered from the last fault)."""
        base, deadline = self.written(), time.time() + timeout
        while time.time() < deadline:
            if self.written() > base:
                return True
            time.sleep(0.2)
        return False

    def owned(self):
        """Partitions this pod owns now, from its assignment log lines."""
        owned = set()
        with open(self.logpath) as f:
            for line in f:
                if "partitions assigned" in line or "partitions revoked" in line:
                    parts = set(re.findall(r"\[(\d+)\]", line.split("partitions=", 1)[-1]))
                    owned = owned | parts if "assigned" in line else owned - parts
                elif "ingest running" in line:
                    owned = set()  # a new process
        return owned

    def wait_owns_all(self, timeout=60):
        """Until one pod owns every partition: the group is stable, not mid-rebalance."""
        deadline = time.time() + timeout
        while time.time() < deadline and len(self.owned()) < PARTITIONS:
            time.sleep(0.3)

    def wait_writing(self, timeout=60):
        """Until this process has written something: a kill then lands mid-stream, not mid-join."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.written() == 0:
            time.sleep(0.2)

    def ready(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except Exception:
            return False

    def alive(self):
        return self.proc.poll() is None


class CheckpointWatch(threading.Thread):
    """Samples cdc_lake.checkpoints; any value below an earlier one is a violation."""

    def __init__(self, dsn):
        super().__init__(daemon=True)
        self.dsn, self.best, self.violations, self.samples = dsn, {}, [], 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with psycopg2.connect(self.dsn, connect_timeout=2) as c, c.cursor() as cur:
                    cur.execute("SELECT sink, consumer, kafka_topic, kafka_partition, next_offset FROM cdc_lake.checkpoints")
                    for sink, consumer, t, p, n in cur.fetchall():
                        k = (sink, consumer, t, p)
                        if n < self.best.get(k, -1):
                            self.violations.append({"checkpoint": list(k), "was": self.best[k], "now": n})
                        self.best[k] = max(n, self.best.get(k, -1))
                    self.samples += 1
            except psycopg2.Error:
                pass  # the database is being restarted on purpose
            self.stop.wait(0.3)


class Compactions(threading.Thread):
    """`cdc-lake lake compact` beside the streaming pod, run after run, most of them killed
    with SIGKILL at a random moment: a dead compaction must leave the lake as it was (every
    reader sees each offset once), and the next run finishes or undoes what it left. Retention
    0 s, so vacuums run while readers read."""

    COMMAND = ["lake", "compact", "--before", "2100-01-01", "--retention", "0s", "--target-size", "1MiB"]

    def __init__(self, args, env):
        super().__init__(daemon=True)
        self.bin, self.env = args.bin, env
        self.logpath = os.path.join(args.out_dir, "compactions.log")
        self.rng = random.Random(11)
        self.stop = threading.Event()
        # Held for the length of a run: pause() returns once no compaction is running.
        self.running, self.paused = threading.Lock(), False
        self.runs, self.killed, self.failed = 0, 0, []

    def pause(self):
        """No compaction while the S3 API server is down (it would fail, as it should)."""
        with self.running:
            self.paused = True

    def resume(self):
        self.paused = False

    def once(self, kill_after=None):
        """One run, SIGKILLed after `kill_after` seconds if still running. Its exit code, or None if killed."""
        with open(self.logpath, "a") as logf:
            logf.write(f"--- run {self.runs + 1} (kill after {kill_after})\n")
            logf.flush()
            p = subprocess.Popen([self.bin, *self.COMMAND], env=self.env, stdout=logf, stderr=logf)
            try:
                rc = p.wait(timeout=kill_after if kill_after is not None else 300)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                if kill_after is None:
                    rc = "timed out after 300 s"
                else:
                    self.killed += 1
                    rc = None
        self.runs += 1
        if rc not in (0, None):
            self.failed.append({"run": self.runs, "exit": rc})
        return rc

    def run(self):
        while not self.stop.is_set():
            with self.running:
                if not self.paused:
                    self.once(self.rng.uniform(0.05, 1.5) if self.rng.random() < 0.7 else None)
            self.stop.wait(self.rng.uniform(0.2, 1.5))


def sink_cluster():
    """(version, name) of the Debian PostgreSQL cluster on the sink's port (5432)."""
    port = os.environ.get("FAULTS_PG_PORT", "5432")
    out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 3 and f[2] == port:
            return f[0], f[1]
    return "15", "main"


def group_members(admin, group):
    try:
        fut = admin.describe_consumer_groups([group], request_timeout=5)[group]
        return len(fut.result().members)
    except Exception:
        return None


def wait_group_empty(admin, group, timeout=40):
    """tansu stalls a join while a killed member is still leaving: wait for it to go (a real
    crash takes session.timeout.ms anyway)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if group_members(admin, group) == 0:
            time.sleep(2)  # let the broker settle the empty group before the next join
            return
        time.sleep(0.3)


def read_topic(broker, topic, expected):
    """Every record of the topic as the broker returns it: {(partition, offset): (key, value)}.
    Reads until it has `expected` records and nothing more arrives for 5 s (tansu's high
    watermarks lag behind, so they cannot tell the end)."""
    c = Consumer({"bootstrap.servers": broker, "group.id": f"faults-read-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    out, last_new, deadline = {}, time.time(), time.time() + 600
    while time.time() < deadline and (len(out) < expected or time.time() - last_new < 5):
        for m in c.consume(10000, 1.0):
            if m.error():
                continue
            out[(m.partition(), m.offset())] = (m.key(), m.value())
            last_new = time.time()
    c.close()
    return out


def check(args, dsn, topic, prefix, delivered, watch, storm):
    """Compares every sink with the broker's records. Returns (checks, figures). `storm` maps
    the data-fault storm's (partition, offset) to what each sink must have done with it."""
    records = read_topic(args.broker, topic, delivered)
    ends = {}
    for p, o in records:
        ends[p] = max(ends.get(p, 0), o + 1)
    expected = set(records)
    raw = query(dsn, "SELECT kafka_partition, kafka_offset, count(*) OVER (PARTITION BY kafka_partition, kafka_offset) FROM cdc_raw.cdc_events WHERE kafka_topic = %s", (topic,))
    raw_set = {(p, o) for p, o, _ in raw}
    raw_dups = sum(1 for *_, n in raw if n > 1)
    rejects = query(dsn, "SELECT kafka_partition, kafka_offset, reason FROM cdc_raw.cdc_rejects WHERE kafka_topic = %s AND stage IN ('decode', 'raw')", (topic,))
    reject_set = {(p, o) for p, o, _ in rejects}
    raw_stage = {(p, o) for p, o in query(dsn, "SELECT kafka_partition, kafka_offset FROM cdc_raw.cdc_rejects WHERE kafka_topic = %s AND stage = 'raw'", (topic,))}
    poison = {k for k, (key, _) in records.items() if key == b"poison"}
    stored = raw_set | reject_set
    lost = sorted(expected - stored)
    extra = sorted(stored - expected)

    lake = json.loads(subprocess.run([sys.executable, os.path.join(REPO, "tests", "lake_check.py"), "--s3", args.s3, "cdc-lake", prefix],
                                     capture_output=True, text=True, check=True).stdout)
    lake_set = {(c[1], c[2]) for c in lake["coords"] if c[0] == topic}
    delta = lake.get("delta", {})
    # Manifest ranges: contiguous per partition, from the lake's own manifest files.
    import pyarrow.fs as pafs
    fs = pafs.S3FileSystem(endpoint_override=args.s3.split("://")[1], scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    gaps = []
    for p in range(PARTITIONS):
        sel = pafs.FileSelector(f"cdc-lake/{prefix}/_manifest/{topic}/{p}", allow_not_found=True)
        commits = []
        for info in fs.get_file_info(sel):
            if info.path.endswith(".json") and not info.path.endswith("_pending.json"):
                with fs.open_input_stream(info.path) as f:
                    commits.append(json.loads(f.read()))
        commits.sort(key=lambda c: c["first_offset"])
        for a, b in zip(commits, commits[1:]):
            if a["next_offset"] != b["first_offset"]:
                gaps.append([p, a["next_offset"], b["first_offset"]])
        if commits and commits[-1]["next_offset"] != ends.get(p, 0):
            gaps.append([p, commits[-1]["next_offset"], ends.get(p, 0)])

    # Reference model: the last change per key, in offset order within its partition.
    model = {}
    for (p, o) in sorted(records):
        key, value = records[(p, o)]
        if key == b"poison" or value is None or (p, o) in storm:
            continue
        v = json.loads(value)
        oid = json.loads(key)["id"]
        if v["op"] == "d":
            model.pop(oid, None)
        else:
            model[oid] = (v["after"]["status"], round(float(v["after"]["total"]), 2))
    mirror = {r[0]: (r[1], round(float(r[2]), 2)) for r in query(dsn, "SELECT id::text, status, total FROM cdc_processed.orders")}
    mirror_missing = [k for k in model if k not in mirror]
    mirror_extra = [k for k in mirror if k not in model]
    mirror_wrong = [k for k in model if k in mirror and mirror[k] != model[k]]

    # The data-fault storm, per sink, against what each record must have become.
    state_rejects = {(p, o): r for p, o, r in query(dsn, "SELECT kafka_partition, kafka_offset, reason FROM cdc_raw.cdc_rejects WHERE kafka_topic = %s AND stage = 'state'", (topic,))}
    in_mirrors = set()
    for table in sorted({r["table"] for r in storm.values() if r["state"] == "stored"}):
        # The documented mirror name of a public table (docs/naming.md): `.` and `\` escaped by `\`.
        mirror_name = table.replace("\\", "\\\\").replace(".", "\\.")
        quoted = '"' + mirror_name.replace('"', '""') + '"'
        in_mirrors |= {(p, o) for p, o in query(dsn, f"SELECT cdc_kafka_partition, cdc_kafka_offset FROM cdc_processed.{quoted}")}
    storm_raw_wrong = [list(c) for c, r in storm.items() if (c in raw_stage) != r["raw_rejected"] or (c in raw_set) == r["raw_rejected"]]
    storm_state_wrong = [list(c) for c, r in storm.items()
                         if (r["state"] == "stored" and c not in in_mirrors) or (r["state"] == "rejected" and not state_rejects.get(c))]
    storm_lake_missing = [list(c) for c in storm if c not in lake_set]

    checks = {
        "raw_and_rejects_cover_every_record": not lost,
        "nothing_stored_that_the_broker_does_not_have": not extra,
        "raw_no_duplicates": raw_dups == 0,
        "raw_and_rejects_disjoint": not (raw_set & reject_set),
        "poison_all_rejected_with_reason": poison <= reject_set and all(r for *_, r in rejects),
        # Changes the raw log rejects at its own stage (a NUL, a timestamp PostgreSQL cannot
        # hold) are still changes: the lake stores them.
        "lake_equals_raw_plus_raw_stage_rejects": lake_set == raw_set | raw_stage,
        "data_faults_raw_stored_or_rejected_with_bytes": not storm_raw_wrong,
        "data_faults_state_stored_or_rejected_with_reason": not storm_state_wrong,
        "data_faults_all_in_lake": not storm_lake_missing,
        "lake_no_duplicates": lake["duplicates"] == 0,
        "lake_nothing_outside_manifest": not lake["unlisted"] and not lake["missing"],
        "lake_no_zero_byte_objects": lake["zero_byte"] == 0,
        "lake_no_pending_upload": lake["pending"] == 0,
        "lake_manifest_ranges_contiguous": not gaps,
        # With Delta tables (the default; not with CDC_LAKE_FAULTS_FORMAT=parquet), through the Delta log (read by the
        # deltalake package) after the final SIGTERM: every offset in exactly one file of the
        # current snapshot, the snapshot's files exactly the manifest's, and no log entry naming
        # a missing file.
        "delta_each_offset_once": not DELTA or (delta.get("duplicates") == 0
        and {(c[1], c[2]) for c in delta.get("coords", []) + delta.get("uncovered_coords", []) if c[0] == topic} == lake_set),
        "delta_files_equal_manifest": not DELTA or (bool(delta) and not delta["unlisted"] and not delta["unpublished"]),
        "delta_no_missing_files": not DELTA or (bool(delta) and not delta["missing"]),
        "mirror_equals_reference_model": not (mirror_missing or mirror_extra or mirror_wrong),
        "checkpoints_never_moved_backwards": not watch.violations,
    }
    figures = {
        "records_delivered": delivered, "records_in_broker": len(records), "raw_rows": len(raw), "rejects": len(rejects), "poison": len(poison),
        "lost": len(lost), "duplicated": raw_dups + lake["duplicates"], "lake_rows": lake["rows"], "lake_files": lake["files"],
        "lake_current_files": lake["current_files"], "lake_compactions": lake["compactions"], "lake_retired": len(lake["retired"]),
        "delta_rows": delta.get("rows"), "delta_files": delta.get("files"), "delta_tables": len(delta.get("tables", {})),
        "mirror_rows": len(mirror), "model_rows": len(model), "mirror_missing": len(mirror_missing),
        "mirror_extra": len(mirror_extra), "mirror_wrong": len(mirror_wrong), "manifest_gaps": gaps[:10],
        "checkpoint_samples": watch.samples, "checkpoint_violations": watch.violations[:10],
        "lost_sample": lost[:10], "extra_sample": extra[:10],
        "data_fault_records": len(storm), "raw_stage_rejects": len(raw_stage), "state_rejects": len(state_rejects),
        "data_fault_raw_wrong": storm_raw_wrong[:10], "data_fault_state_wrong": storm_state_wrong[:10],
        "data_fault_lake_missing": storm_lake_missing[:10],
    }
    return checks, figures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", required=True)
    ap.add_argument("--bin", required=True, help="the cdc-lake binary")
    ap.add_argument("--s3", required=True, help="S3 API endpoint (bucket cdc-lake)")
    ap.add_argument("--tansu-pid", required=True)
    ap.add_argument("--moto-pid", required=True)
    ap.add_argument("--events", type=int, default=200_000, help="at least this many; the stream runs until the last fault")
    ap.add_argument("--rate", type=int, default=1500, help="events/s produced while faults run")
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--s3-outage", type=int, default=30, help="seconds the S3 API server is unresponsive")
    ap.add_argument("--backlog", type=int, default=1_000_000, help="events for the backlog run (0 skips)")
    ap.add_argument("--data-fault-rounds", type=int, default=40, help="rounds of the data-fault storm (one record of each class per round)")
    ap.add_argument("--short", action="store_true", help="CI version: at least 30k events at 400/s, 5 kills, 10 s S3 outage, no backlog")
    ap.add_argument("--out", default=os.path.join(REPO, "results"))
    args = ap.parse_args()
    if args.short:
        args.events, args.rate, args.kills, args.s3_outage, args.backlog = 30_000, 400, 5, 10, 0
        args.data_fault_rounds = 10
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out_dir = os.path.join(args.out, f"faults-{stamp}{'-short' if args.short else ''}")
    os.makedirs(args.out_dir, exist_ok=True)

    run_id = uuid.uuid4().hex[:8]
    topic, prefix, group = f"faults-{run_id}.public.orders", f"faults-{run_id}", f"faults-{run_id}"
    db = f"cdcf_{run_id}"
    admin_sql(f"CREATE DATABASE {db}")
    dsn = f"{PG_BASE}/{db}"
    admin = AdminClient({"bootstrap.servers": args.broker})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result()
    secret = tempfile.NamedTemporaryFile("w", delete=False, prefix="faults-s3-")
    secret.write("testing")
    secret.close()
    env = {**os.environ,
           "CDC_LAKE__KAFKA__BROKERS": args.broker, "CDC_LAKE__KAFKA__GROUP_ID": group,
           "CDC_LAKE__KAFKA__CHECKPOINT_NAME": group,
           "CDC_LAKE__KAFKA__TOPICS": f"['{topic}']", "CDC_LAKE__POSTGRES__URL": dsn,
           "CDC_LAKE__LAKE__PREFIX": prefix, "CDC_LAKE__LAKE__ROLL_AGE": "2s",
           "CDC_LAKE__LAKE__TABLE_FORMAT": "delta" if DELTA else "parquet",
           "CDC_LAKE__LAKE__DELTA__CHECKPOINT_INTERVAL": "10",
           "CDC_LAKE__LAKE__S3__BUCKET": "cdc-lake", "CDC_LAKE__LAKE__S3__ENDPOINT": args.s3,
           "CDC_LAKE__LAKE__S3__ALLOW_HTTP": "true", "CDC_LAKE__LAKE__S3__ACCESS_KEY_ID": "testing",
           "CDC_LAKE__LAKE__S3__SECRET_ACCESS_KEY_FILE": secret.name, "CDC_LAKE__LAKE__S3__REQUEST_TIMEOUT": "2s",
           "CDC_LAKE__BATCH__MAX_RECORDS": "2000", "CDC_LAKE__TARGETS": "{}",
           "RUST_LOG": "info,rdkafka=warn"}
    faults = []
    failures = []
    join_retries = []

    def restart(p, killed=True):
        """Starts a pod again: after a kill -9 in a fresh consumer group (same checkpoint name),
        so nothing waits for the dead member to leave; after SIGTERM, which leaves the group, in
        the same one. Should the broker still never complete a join (a tansu quirk, see
        ENVIRONMENT.md), the pod is restarted in another fresh group after 30 s without
        progress, and each such retry is reported."""
        for _ in range(5):
            if killed:
                p.fresh_group()
            p.start()
            if p.wait_progress(timeout=30):
                return
            join_retries.append(round(time.time() - t0, 1))
            log("no progress 30 s after the restart (tansu join stall); restarting the pod")
            p.kill9()
            killed = True
        failures.append("the pod never resumed after a restart")

    def fault(kind, **kw):
        # The pod's peak RSS so far, per fault: where the run's peak comes from.
        pod.sample_rss()
        kw["peak_rss_mb_so_far"] = round(pod.peak_kb / 1024, 1)
        faults.append({"kind": kind, "at": round(time.time() - t0, 1), **kw})
        log(f"fault {len(faults)}: {kind} {kw if kw else ''}")

    watch = CheckpointWatch(dsn)
    stream = Stream(args.broker, topic, args.events, args.rate)
    t0 = time.time()
    pod = Pod(args, env, "a")
    time.sleep(3)
    stream.thread.start()
    watch.start()
    rng = random.Random(5)

    # 1. kill -9 at random moments (inside COPYs, uploads, between write and commit), while
    # compactions beside the pod are killed at random moments too.
    compactions = Compactions(args, env)
    compactions.start()
    for k in range(args.kills):
        pod.wait_writing()
        time.sleep(rng.uniform(0.1, 2.0))
        pod.kill9()
        fault("kill -9", n=k + 1, produced=stream.sent)
        restart(pod)

    pod.wait_progress()
    # 2. PostgreSQL: connections terminated, then the server restarted.
    connected = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'cdc-lake%%' AND datname = %s"
    for _ in range(60):
        if query(f"{PG_BASE}/postgres", connected, (db,))[0][0] >= 2:
            break
        time.sleep(0.5)
    n = query(f"{PG_BASE}/postgres", "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'cdc-lake%%' AND datname = %s", (db,))[0][0]
    fault("pg_terminate_backend", connections=n)
    time.sleep(3)
    pg_restart = subprocess.run(["pg_ctlcluster", *sink_cluster(), "restart"], capture_output=True, text=True)
    fault("postgresql restart", ok=pg_restart.returncode == 0, detail=pg_restart.stderr.strip()[:200])
    if pg_restart.returncode != 0:
        failures.append("could not restart PostgreSQL: " + pg_restart.stderr.strip())

    pod.wait_progress()
    # 3. Broker outage. (tansu here keeps topics in memory, so a real restart would empty them:
    # the broker is frozen instead, which the pod sees as an unreachable broker.)
    time.sleep(3)
    tansu = int(open(args.tansu_pid).read())
    os.kill(tansu, signal.SIGSTOP)
    time.sleep(10)
    os.kill(tansu, signal.SIGCONT)
    fault("broker outage (SIGSTOP 10 s)")

    pod.wait_progress()
    # 4. S3 API server unresponsive: the lake falls behind, raw keeps going, readiness flips.
    time.sleep(3)
    moto = int(open(args.moto_pid).read())
    raw_before = query(dsn, "SELECT coalesce(sum(next_offset), 0) FROM cdc_lake.checkpoints WHERE sink = 'raw'")[0][0]
    compactions.pause()
    os.kill(moto, signal.SIGSTOP)
    saw_not_ready, t_out = False, time.time()
    while time.time() - t_out < args.s3_outage:
        saw_not_ready |= not pod.ready()
        pod.sample_rss()
        time.sleep(0.5)
    raw_during = query(dsn, "SELECT coalesce(sum(next_offset), 0) FROM cdc_lake.checkpoints WHERE sink = 'raw'")[0][0]
    os.kill(moto, signal.SIGCONT)
    compactions.resume()
    ready_again = False
    for _ in range(120):
        if pod.ready():
            ready_again = True
            break
        time.sleep(0.5)
    fault("S3 outage (SIGSTOP)", seconds=args.s3_outage, not_ready_seen=saw_not_ready, ready_again=ready_again,
          raw_advanced_during=int(raw_during - raw_before))

    pod.wait_progress()
    # 5. A second pod joins mid-stream (the first pod's group), then the first is killed.
    pod_b = Pod(args, pod.env, "b")
    time.sleep(12)
    fault("second pod joined")
    pod.kill9()
    fault("kill -9 of the first pod while two share the group")
    pod = pod_b

    pod.wait_progress()
    # 6. Poison storm.
    time.sleep(3)
    stream.poison(1000, partition=1)
    fault("poison storm", records=1000, partition=1)

    pod.wait_progress()
    # 7. The data-fault storm, interleaved with the order stream on every partition; readiness
    # is sampled throughout: one record must never hold a sink beyond the retry bound.
    pod.wait_owns_all()
    storm_records = data_fault_records(args.data_fault_rounds, random.Random(7))
    storm = {}

    def on_storm(err, msg, rec):
        if err is None:
            storm[(msg.partition(), msg.offset())] = rec
            stream.delivered += 1

    sp = Producer({"bootstrap.servers": args.broker, "linger.ms": 5, "message.max.bytes": 10_000_000})
    not_ready_since, longest_not_ready = None, 0.0
    for rec in storm_records:
        kw = {"timestamp": rec["timestamp"]} if rec["timestamp"] is not None else {}
        sp.produce(topic, key=rec["key"].encode(), value=rec["value"].encode(), partition=rec["partition"],
                   on_delivery=lambda err, msg, rec=rec: on_storm(err, msg, rec), **kw)
        sp.poll(0)
    sp.flush(60)
    t_storm = time.time()
    while time.time() - t_storm < 20:
        now = time.time()
        if pod.ready():
            not_ready_since = None
        else:
            not_ready_since = not_ready_since or now
            longest_not_ready = max(longest_not_ready, now - not_ready_since)
        time.sleep(0.2)
    fault("data-fault storm", records=len(storm), rounds=args.data_fault_rounds,
          longest_not_ready_s=round(longest_not_ready, 1))

    # 8. A sink failing on one record (a trigger raising a serialization failure for one table's
    # raw row, retried forever): SIGTERM while it fails must keep its checkpoint and exit
    # non-zero; a kill -9 while it fails must lose nothing either.
    admin_sql_db = psycopg2.connect(dsn)
    admin_sql_db.autocommit = True
    admin_sql_db.cursor().execute(
        "CREATE FUNCTION faults_wedge() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'wedged by the fault suite' USING ERRCODE = '40001'; END $$; "
        "CREATE TRIGGER faults_wedge BEFORE INSERT ON cdc_raw.cdc_events FOR EACH ROW "
        "WHEN (NEW.source_table = 'public.df_wedge') EXECUTE FUNCTION faults_wedge()")
    wedge = {"partition": 2, "key": json.dumps({"id": 1}), "value": df_envelope("df_wedge", {"id": 1}, 99_000_000),
             "timestamp": None, "table": "df_wedge", "state": "stored", "raw_rejected": False}

    def wait_failing(p, timeout=60):
        base, deadline = p.sink_errors(), time.time() + timeout
        while time.time() < deadline:
            if p.sink_errors() > base + 1:
                return True
            time.sleep(0.2)
        return False

    base_errors = pod.sink_errors()
    sp.produce(topic, key=wedge["key"].encode(), value=wedge["value"].encode(), partition=wedge["partition"],
               on_delivery=lambda err, msg: on_storm(err, msg, wedge))
    sp.flush(60)
    failing = wait_failing(pod) or pod.sink_errors() > base_errors
    took = pod.sigterm()
    fault("SIGTERM while the raw sink fails", failing_seen=failing, exit_code=pod.exit_code(),
          exit_seconds=round(took, 2))
    wedge_sigterm = {"failing": failing, "exit_code": pod.exit_code(), "seconds": took}
    pod.start()  # SIGTERM left the group: the same one
    failing_again = wait_failing(pod)
    pod.kill9()
    fault("kill -9 while the raw sink fails", failing_seen=failing_again)
    admin_sql_db.cursor().execute("DROP TRIGGER faults_wedge ON cdc_raw.cdc_events")
    admin_sql_db.close()
    restart(pod)

    # 9. SIGTERM under load. (After the rebalance settles: tansu never completes a later join
    # when a member leaves in the middle of a rebalance.)
    pod.wait_owns_all()
    time.sleep(4)
    took = pod.sigterm()
    fault("SIGTERM under load", exit_seconds=round(took, 2))
    restart(pod)

    # Drain: every record produced, every sink at the end.
    stream.finish.set()
    stream.thread.join()
    log(f"stream done: {stream.sent} produced; waiting for every sink to reach the end of the topic")
    deadline = time.time() + 600
    total = stream.delivered
    while time.time() < deadline:
        pod.sample_rss()
        rows = query(dsn, "SELECT sink, coalesce(sum(next_offset), 0) FROM cdc_lake.checkpoints GROUP BY sink")
        done = {s: n for s, n in rows}
        if done.get("raw") == total and done.get("state") == total:
            break
        time.sleep(1)
    compactions.stop.set()
    compactions.join()
    fault("compactions beside the pod, from the first kill to the drain", runs=compactions.runs,
          killed=compactions.killed, failed=compactions.failed[:5])
    time.sleep(4)  # the lake's roll age
    took_final = pod.sigterm()
    watch.stop.set()
    watch.join()
    # Compactions to the end: the first undoes or finishes what the killed ones left and merges
    # what the stream wrote since; the second vacuums what the first replaced (a run vacuums
    # before it merges). The checks below read the compacted, vacuumed lake.
    final_compaction = [compactions.once(), compactions.once()]
    fault("two compactions to the end", exits=final_compaction)

    checks, figures = check(args, dsn, topic, prefix, stream.delivered, watch, storm)
    storm_fault = next(f for f in faults if f["kind"] == "data-fault storm")
    checks["data_faults_never_held_readiness_beyond_the_retry_bound"] = storm_fault["longest_not_ready_s"] < 10
    checks["sigterm_while_failing_exits_nonzero_in_time"] = (
        wedge_sigterm["failing"] and wedge_sigterm["exit_code"] not in (0, None) and wedge_sigterm["seconds"] <= 10)
    sigterm_ok = all(f["exit_seconds"] <= 10 for f in faults if f["kind"] == "SIGTERM under load") and took_final <= 10
    s3 = next(f for f in faults if f["kind"].startswith("S3 outage"))
    checks["sigterm_exit_within_10s"] = sigterm_ok
    checks["not_ready_during_s3_outage_then_ready"] = s3["not_ready_seen"] and s3["ready_again"]
    checks["postgresql_restarted_and_pod_resumed"] = not failures
    # A compaction not killed finishes, whatever the pod and the killed runs are doing.
    checks["compactions_not_killed_succeed"] = not compactions.failed and final_compaction == [0, 0]
    checks["compactions_ran_and_were_killed"] = compactions.killed > 0 and figures["lake_compactions"] > 0
    checks["vacuum_deleted_every_replaced_file"] = figures["lake_retired"] == 0
    figures["failures"] = failures
    figures["tansu_join_retries"] = join_retries
    figures["peak_rss_mb"] = round(max(pod.peak_kb, pod_b.peak_kb) / 1024, 1)

    report = {"short": args.short, "events": args.events, "faults": faults, "faults_injected": len(faults),
              "checks": checks, "figures": figures, "passed": all(checks.values())}
    write_report(args, report)
    if args.backlog:
        log(f"fault checks {'passed' if report['passed'] else 'FAILED'}; backlog run of {args.backlog} events")
        figures["backlog"] = backlog(args, env)
        checks["backlog_group_stable"] = figures["backlog"]["rebalances"] <= 1
        report["passed"] = all(checks.values())
        write_report(args, report)
    print(render_md(report))
    log(f"report: {args.out_dir}/report.md")
    if report["passed"]:
        admin_sql(f"DROP DATABASE IF EXISTS {db}")
    sys.exit(0 if report["passed"] else 1)


def write_report(args, report):
    with open(os.path.join(args.out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write(render_md(report))


def backlog(args, env):
    """A fresh pod on a backlog: peak RSS and how often the group rebalanced."""
    topic = f"faults-backlog-{uuid.uuid4().hex[:6]}.public.orders"
    admin = AdminClient({"bootstrap.servers": args.broker})  # must outlive the request
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result()
    s = Stream(args.broker, topic, args.backlog, rate=10**9)
    s.finish.set()
    s.run()
    db = f"cdcf_backlog_{uuid.uuid4().hex[:6]}"
    admin_sql(f"CREATE DATABASE {db}")
    benv = {**env, "CDC_LAKE__KAFKA__TOPICS": f"['{topic}']", "CDC_LAKE__KAFKA__GROUP_ID": f"g-{db}",
            "CDC_LAKE__POSTGRES__URL": f"{PG_BASE}/{db}", "CDC_LAKE__LAKE__PREFIX": db,
            "CDC_LAKE__BATCH__MAX_RECORDS": "10000"}
    pod = Pod(args, benv, "backlog")
    t0 = time.time()
    while time.time() - t0 < 1800:
        pod.sample_rss()
        try:
            n = query(f"{PG_BASE}/{db}", "SELECT coalesce(sum(next_offset), 0) FROM cdc_lake.checkpoints WHERE sink = 'state'")
        except psycopg2.errors.UndefinedTable:
            n = None  # the pod has not migrated its database yet
        if n and n[0][0] >= args.backlog:
            break
        time.sleep(0.5)
    secs = time.time() - t0
    pod.sigterm()
    assigned = sum(1 for line in open(pod.logpath) if "partitions assigned" in line)
    return {"events": args.backlog, "seconds": round(secs, 1), "peak_rss_mb": round(pod.peak_kb / 1024, 1),
            "rebalances": assigned}


def render_md(r):
    f = r["figures"]
    lines = [f"# cdc-lake fault suite{' (short)' if r['short'] else ''}: {'PASSED' if r['passed'] else 'FAILED'}", "",
             f"{r['faults_injected']} faults while {f['records_delivered'] - f['poison']:,} order envelopes streamed; {f['records_in_broker']:,} records checked "
             f"(lost {f['lost']}, duplicated {f['duplicated']}); peak RSS {f['peak_rss_mb']} MB.", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {k} | {'ok' if v else 'FAILED'} |" for k, v in r["checks"].items()]
    lines += ["", "| # | t (s) | fault | details |", "|---|---|---|---|"]
    for i, x in enumerate(r["faults"], 1):
        details = ", ".join(f"{k}={v}" for k, v in x.items() if k not in ("kind", "at"))
        lines.append(f"| {i} | {x['at']} | {x['kind']} | {details} |")
    if "backlog" in f:
        b = f["backlog"]
        lines += ["", f"Backlog: {b['events']:,} events in {b['seconds']} s, peak RSS {b['peak_rss_mb']} MB, partition assignments {b['rebalances']}."]
    lines += ["", "Figures: " + json.dumps({k: v for k, v in f.items() if k != "backlog"})]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
