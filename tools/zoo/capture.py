"""Captures real Debezium output for the type zoo (tools/zoo/*.sql) under one connector setting.

Creates a fresh source database, loads the zoo and its snapshot rows, starts a dedicated
Debezium connector (tools/lib.sh start_debezium) with truncates, transaction metadata and
heartbeats switched on, applies tools/zoo/changes.sql once the snapshot has streamed, then reads
every record of the connector's topics back from the broker into one NDJSON file in the shared
samples' format: {"topic", "partition", "offset", "timestamp", "key", "value"}. Avro records keep
their exact bytes instead, as "key_base64" and "value_base64", and every writer schema they
reference is saved next to the file (OUT with .schemas.json: {"<id>": "<schema>"}, from the
registry's GET /schemas/ids/{id}), so tests decode them without a registry.

The source database stays up (the live round-trip test compares against it); --drop removes it
and the connector's slot afterwards.

Usage: capture.py --format seed|schema|strings|avro --prefix NAME --out FILE [--drop]
"""
import argparse
import base64
import json
import urllib.request
import os
import subprocess
import sys
import time

import psycopg2
from confluent_kafka import Consumer, TopicPartition

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = os.path.join(TOOLS, "zoo")
PORT = int(os.environ.get("SOURCE_PG_PORT", "55432"))
BROKER = os.environ.get("BROKER", "127.0.0.1:" + os.environ.get("BROKER_PORT", "19092"))
REGISTRY = os.environ.get("REGISTRY_URL", "http://127.0.0.1:18081")
# Settings beyond the two formats: every shape the issue names must appear in the capture.
EXTRA = [
    "skipped.operations=none",
    "provide.transaction.metadata=true",
    "heartbeat.interval.ms=3000",
]


def log(msg):
    print(f"[capture-zoo] {msg}", file=sys.stderr, flush=True)


def lib(cmd):
    subprocess.run(["bash", "-c", f'source "{TOOLS}/lib.sh"; {cmd}'], check=True)


def source(db, autocommit=True):
    conn = psycopg2.connect(host="127.0.0.1", port=PORT, user="postgres", dbname=db)
    conn.autocommit = autocommit
    return conn


def drop_db(db):
    admin = source("postgres")
    with admin.cursor() as c:
        c.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
            (db,),
        )
        c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    admin.close()


def run_sql(db, name):
    # psql, not psycopg2: changes.sql relies on psql's one-transaction-per-statement autocommit.
    subprocess.run(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres",
         "-d", db, "-f", os.path.join(ZOO, name)],
        check=True, stdout=subprocess.DEVNULL,
    )


class Reader:
    """Reads every record of the prefix's topics from offset 0, in arrival order per partition."""

    def __init__(self, prefix, binary):
        self.prefix = prefix
        self.binary = binary
        self.consumer = Consumer({
            "bootstrap.servers": BROKER,
            "group.id": f"capture-{prefix}-{time.time_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "topic.metadata.refresh.interval.ms": 1000,
        })
        pattern = prefix.replace(".", "\\.")
        self.consumer.subscribe([f"^{pattern}\\..*", f"^__debezium-heartbeat\\.{pattern}$"])
        # By coordinates: a regex subscription rebalances as topics appear, and without
        # commits the consumer then reads partitions again from the start.
        self.records = {}
        self.values = {}

    def poll(self, seconds):
        deadline = time.time() + seconds
        while time.time() < deadline:
            m = self.consumer.poll(0.2)
            if m is None or m.error():
                continue
            record = {
                "topic": m.topic(),
                "partition": m.partition(),
                "offset": m.offset(),
                "timestamp": m.timestamp()[1],
            }
            if self.binary:
                b64 = lambda b: base64.b64encode(b).decode() if b is not None else None
                record.update(key_base64=b64(m.key()), value_base64=b64(m.value()))
            else:
                record.update(
                    key=m.key().decode() if m.key() is not None else None,
                    value=m.value().decode() if m.value() is not None else None,
                )
            # Predicates read the value as bytes: Avro strings are stored as their UTF-8 bytes.
            self.values[(m.topic(), m.partition(), m.offset())] = m.value()
            self.records[(m.topic(), m.partition(), m.offset())] = record

    def count(self, topic_suffix, predicate):
        return sum(
            1 for (topic, _, _), v in self.values.items()
            if topic == f"{self.prefix}.{topic_suffix}" and v and predicate(v)
        )

    def wait_for(self, what, topic_suffix, predicate, n=1, timeout=180):
        deadline = time.time() + timeout
        while self.count(topic_suffix, predicate) < n:
            if time.time() > deadline:
                # What the source cluster was doing: a slot is created only once every older
                # transaction has ended.
                for sql in ("SELECT pid, datname, application_name, backend_type, state, wait_event_type, wait_event, "
                            "date_trunc('second', now() - xact_start) AS in_xact, left(query, 60) AS query "
                            "FROM pg_stat_activity WHERE backend_type IN ('client backend', 'walsender')",
                            "SELECT slot_name, database, active, active_pid FROM pg_replication_slots"):
                    subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres",
                                    "-d", "postgres", "-c", sql], stdout=sys.stderr)
                sys.exit(f"capture-zoo: timed out waiting for {what} on {self.prefix}.{topic_suffix}")
            self.poll(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=["seed", "schema", "strings", "avro"], required=True)
    ap.add_argument("--prefix", required=True, help="topic prefix and connector name")
    ap.add_argument("--db", help="source database to create (default: the prefix)")
    ap.add_argument("--out", required=True, help="NDJSON file to write")
    ap.add_argument("--drop", action="store_true", help="drop the source database afterwards")
    args = ap.parse_args()
    db = (args.db or args.prefix).replace("-", "_")
    slot = db

    probe = Consumer({"bootstrap.servers": BROKER, "group.id": "capture-probe"})
    existing = [t for t in probe.list_topics(timeout=10).topics if t.startswith(args.prefix + ".")]
    probe.close()
    if existing:
        sys.exit(f"capture-zoo: the broker already has topics for prefix {args.prefix!r} "
                 f"({existing[0]}, ...); choose another --prefix")

    log(f"creating source database {db}")
    drop_db(db)
    admin = source("postgres")
    with admin.cursor() as c:
        c.execute(f'CREATE DATABASE "{db}"')
    admin.close()
    run_sql(db, "zoo.sql")
    run_sql(db, "snapshot.sql")

    reader = Reader(args.prefix, binary=args.format == "avro")
    lib(f'rm -rf "$CDC_LAKE_RUN/debezium/{args.prefix}"; '
        f'start_debezium {args.prefix} {db} {slot} {args.format} {" ".join(EXTRA)}')
    try:
        # The snapshot's two rows are the table's first records, in either encoding.
        reader.wait_for("the snapshot", "public.type_zoo", lambda v: True, n=2)
        log("snapshot streamed; applying the changes")
        run_sql(db, "changes.sql")
        reader.wait_for("the last change", "public.zoo_truncated", lambda v: b"end of the zoo" in v)
        # The transaction END record and a heartbeat or two follow the last change.
        reader.poll(4)
    finally:
        lib(f"stop_debezium {args.prefix}")
    if args.drop:
        drop_db(db)
    reader.consumer.close()

    records = sorted(reader.records.values(), key=lambda r: (r["timestamp"], r["topic"], r["partition"], r["offset"]))
    with open(args.out, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    topics = sorted({r["topic"] for r in records})
    log(f"wrote {len(records)} records of {len(topics)} topics to {args.out}")
    if args.format == "avro":
        ids = set()
        for r in records:
            for field in ("key_base64", "value_base64"):
                raw = base64.b64decode(r[field]) if r[field] else b""
                if len(raw) >= 5 and raw[0] == 0:
                    ids.add(int.from_bytes(raw[1:5], "big"))
        schemas = {}
        for i in sorted(ids):
            with urllib.request.urlopen(f"{REGISTRY}/schemas/ids/{i}") as resp:
                schemas[str(i)] = json.load(resp)["schema"]
        path = os.path.splitext(args.out)[0] + ".schemas.json"
        with open(path, "w") as f:
            json.dump(schemas, f, indent=1, sort_keys=True)
            f.write("\n")
        log(f"wrote {len(schemas)} writer schemas to {path}")


if __name__ == "__main__":
    main()
