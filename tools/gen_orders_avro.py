"""Produce N order change envelopes to TOPIC as Debezium's Avro converter writes them: the same
workload as tools/peers/gen_orders.py (70% creates, 25% updates, 5% deletes, seed types), with
the key and value schemas registered at REGISTRY (POST /subjects/{topic}-key|value/versions)
and each record Confluent-framed (magic byte 0, the 4-byte schema id, the Avro datum). The
value schema has Debezium's layout (Envelope with before/after Value, the postgresql Source
block, transaction, op, ts_ms); the encoder below writes exactly those types.

Usage: gen_orders_avro.py BROKER TOPIC N REGISTRY_URL
"""
import json
import random
import struct
import sys
import urllib.request
import uuid

from confluent_kafka import Producer


def optional(t, default=None):
    return {"type": ["null", t], "default": default}


def value_schema(topic):
    ns = topic
    value = {"type": "record", "name": "Value", "fields": [
        {"name": "id", "type": "string"},
        {"name": "user_id", "type": "string"},
        {"name": "total", "type": "double"},
        {"name": "status", "type": "string"},
        {"name": "created_at", "type": "long"},
    ], "connect.name": f"{ns}.Value"}
    source = {"type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql", "fields": [
        {"name": "version", "type": "string"},
        {"name": "connector", "type": "string"},
        {"name": "name", "type": "string"},
        {"name": "ts_ms", "type": "long"},
        {"name": "snapshot", "type": [{"type": "string", "connect.version": 1,
                                        "connect.parameters": {"allowed": "true,first,last,false,incremental"},
                                        "connect.default": "false", "connect.name": "io.debezium.data.Enum"}, "null"],
         "default": "false"},
        {"name": "db", "type": "string"},
        {"name": "sequence", **optional("string")},
        {"name": "schema", "type": "string"},
        {"name": "table", "type": "string"},
        {"name": "txId", **optional("long")},
        {"name": "lsn", **optional("long")},
    ], "connect.version": 1, "connect.name": "io.debezium.connector.postgresql.Source"}
    return {"type": "record", "name": "Envelope", "namespace": ns, "fields": [
        {"name": "before", "type": ["null", value], "default": None},
        {"name": "after", "type": ["null", "Value"], "default": None},
        {"name": "source", "type": source},
        {"name": "transaction", "type": ["null", "string"], "default": None},
        {"name": "op", "type": "string"},
        {"name": "ts_ms", **optional("long")},
    ], "connect.version": 2, "connect.name": f"{ns}.Envelope"}


def key_schema(topic):
    return {"type": "record", "name": "Key", "namespace": topic,
            "fields": [{"name": "id", "type": "string"}], "connect.name": f"{topic}.Key"}


def register(registry, subject, schema):
    body = json.dumps({"schema": json.dumps(schema)}).encode()
    req = urllib.request.Request(f"{registry}/subjects/{subject}/versions", data=body, method="POST",
                                 headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["id"]


def zigzag(n):
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def string(s):
    b = s.encode()
    return zigzag(len(b)) + b


def union(branch, encoded=b""):
    return zigzag(branch) + encoded


def row(r):
    return (string(r["id"]) + string(r["user_id"]) + struct.pack("<d", r["total"])
            + string(r["status"]) + zigzag(r["created_at"]))


def envelope(before, after, now, tx, lsn, op):
    source = (string("3.6.3.Final") + string("postgresql") + string("ecom-connector") + zigzag(now)
              + union(0, string("false")) + string("ecomdb") + union(0) + string("public") + string("orders")
              + union(1, zigzag(tx)) + union(1, zigzag(lsn)))
    return (union(0) if before is None else union(1, row(before))) + \
        (union(0) if after is None else union(1, row(after))) + source + union(0) + string(op) + union(1, zigzag(now + 5))


def framed(schema_id, datum):
    return b"\x00" + struct.pack(">I", schema_id) + datum


def main():
    broker, topic, n, registry = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].rstrip("/")
    key_id = register(registry, f"{topic}-key", key_schema(topic))
    value_id = register(registry, f"{topic}-value", value_schema(topic))
    p = Producer({"bootstrap.servers": broker, "linger.ms": 20, "batch.num.messages": 10000})
    random.seed(7)
    ids = []
    lsn = 26_000_000
    for i in range(n):
        lsn += 100
        r = random.random()
        now = 1709123456789 + i
        if ids and r < 0.05:
            oid = ids.pop(random.randrange(len(ids)))
            op = "d"
            before = {"id": oid, "user_id": "u", "total": 1.0, "status": "CONFIRMED", "created_at": now}
            after = None
        elif ids and r < 0.30:
            oid = random.choice(ids)
            op = "u"
            before = None
            after = {"id": oid, "user_id": "u%d" % i, "total": round(random.random() * 100, 2), "status": "SHIPPED", "created_at": now}
        else:
            oid = str(uuid.UUID(int=random.getrandbits(128)))
            ids.append(oid)
            op = "c"
            before = None
            after = {"id": oid, "user_id": "u%d" % i, "total": round(random.random() * 100, 2), "status": "CONFIRMED", "created_at": now}
        value = framed(value_id, envelope(before, after, now, 700 + i, lsn, op))
        p.produce(topic, key=framed(key_id, string(oid)), value=value, partition=0)
        if i % 10000 == 0:
            p.poll(0)
    p.flush(60)
    print("produced", n, "key schema", key_id, "value schema", value_id)


if __name__ == "__main__":
    main()
