"""Independent reader for the cdc-lake lake, used by the integration tests.

Lists every object under the lake (as an analyst's glob would see it), reads each Parquet file
with pyarrow, and checks it against the manifest. Prints one JSON object:
  files, rows, coords ([topic, partition, offset] per row), duplicates, unlisted (objects the
  manifest does not list), missing (listed but absent), zero_byte, manifest_rows, pending,
  status_counts (after.status where present), sample (the newest after image per table),
  types (per table, the Arrow type of each `after` field), state (per table directory, the
  rows a fold of its changes leaves: the newest `after` per Kafka key, deletes removing it).

Usage: lake_check.py --dir PATH | --s3 ENDPOINT BUCKET PREFIX
"""
import collections
import json
import sys

import pyarrow.fs as pafs
import pyarrow.parquet as pq


def finite(v):
    """JSON without NaN or ±Infinity (which json.dumps would write as bare words that strict
    readers refuse): such floats become their text."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [finite(x) for x in v]
    return v


def main():
    # Manifest paths are relative to the store root: the directory, or the bucket.
    if sys.argv[1] == "--dir":
        fs, root = pafs.LocalFileSystem(), sys.argv[2].rstrip("/")
        store_root = root
    else:
        endpoint, bucket, prefix = sys.argv[2:5]
        scheme, host = endpoint.split("://")
        fs = pafs.S3FileSystem(endpoint_override=host, scheme=scheme, access_key="testing",
                               secret_key="testing", region="us-east-1")
        root = f"{bucket}/{prefix}".rstrip("/")
        store_root = bucket
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    objects = {i.path: i.size for i in infos if i.type == pafs.FileType.File}
    data = {p: s for p, s in objects.items() if p.endswith(".parquet")}
    manifests = [p for p in objects if "/_manifest/" in p and p.endswith(".json")]
    listed, manifest_rows, pending = set(), 0, 0
    for m in manifests:
        if m.endswith("_pending.json"):
            pending += 1
            continue
        with fs.open_input_stream(m) as f:
            commit = json.loads(f.read())
        for entry in commit["files"]:
            listed.add(f"{store_root}/{entry['path']}")
            manifest_rows += entry["rows"]
    coords, seen, dups = [], collections.Counter(), 0
    status = collections.Counter()
    sample = {}
    types = {}  # table -> after field -> Arrow type, from the first file that has the field
    changes = collections.defaultdict(list)  # table directory -> (partition, offset, key, op, after)
    rows = 0
    for path in sorted(data):
        t = pq.read_table(path, filesystem=fs)
        rows += t.num_rows
        for rec in t.select(["kafka_topic", "kafka_partition", "kafka_offset"]).to_pylist():
            c = (rec["kafka_topic"], rec["kafka_partition"], rec["kafka_offset"])
            seen[c] += 1
            coords.append(list(c))
        if "after" in t.column_names and "kafka_key" in t.column_names:
            directory = path.split("/cdc_events/")[1].split("/date=")[0]
            try:
                afters = t.column("after").to_pylist()
            except OverflowError:
                afters = None
            if afters is not None:
                for rec, after in zip(
                    t.select(["kafka_partition", "kafka_offset", "kafka_key", "op"]).to_pylist(), afters
                ):
                    changes[directory].append(
                        (rec["kafka_partition"], rec["kafka_offset"], rec["kafka_key"], rec["op"], after)
                    )
        if "after" in t.column_names:
            table = path.split("table=")[1].split("/")[0]
            for field in t.schema.field("after").type:
                types.setdefault(table, {}).setdefault(field.name, str(field.type))
            offsets = t.column("kafka_offset").to_pylist()
            try:
                afters = t.column("after").to_pylist()
            except OverflowError:
                # Python's datetime cannot hold ±infinity dates (the type zoo has them).
                afters = [None] * len(offsets)
            for off, a in zip(offsets, afters):
                if a and "status" in a and a["status"] is not None:
                    status[a["status"]] += 1
                # The newest after image per table (by offset; one partition per sample table).
                if a is not None and (table not in sample or off > sample[table][0]):
                    sample[table] = (off, finite(json.loads(json.dumps(a, default=str))))
    dups = sum(n - 1 for n in seen.values() if n > 1)
    state = {}
    for directory, rows_of in changes.items():
        current = {}
        # One partition per key: Kafka order within the partition is the change order.
        for _, _, key, op, after in sorted(rows_of, key=lambda r: (r[0], r[1])):
            if key is None or op not in ("c", "u", "r", "d"):
                continue
            k = json.loads(key)
            if isinstance(k, dict) and "payload" in k and "schema" in k:
                k = k["payload"]
            k = json.dumps(k, sort_keys=True)
            if op == "d":
                current.pop(k, None)
            else:
                current[k] = finite(json.loads(json.dumps(after, default=str)))
        state[directory] = current
    print(json.dumps(finite({
        "files": len(data),
        "rows": rows,
        "coords": coords,
        "duplicates": dups,
        "unlisted": sorted(p for p in data if p not in listed),
        "missing": sorted(p for p in listed if p not in data),
        "zero_byte": sum(1 for s in data.values() if s == 0),
        "manifest_rows": manifest_rows,
        "pending": pending,
        "status_counts": dict(status),
        "sample": {t: a for t, (_, a) in sample.items()},
        "types": types,
        "state": state,
    }), allow_nan=False))


if __name__ == "__main__":
    main()
