"""Independent reader for the cdc-lake lake, used by the integration tests.

Lists every object under the lake (as an analyst's glob would see it), reads each Parquet file
with pyarrow, and checks it against the manifest (commits, with the compaction records applied).
Files a compaction replaced and that wait for their retention are left out of the read and
reported as `retired`. Prints one JSON object:
  files, rows, coords ([topic, partition, offset] per row), duplicates, unlisted (objects no
  commit or compaction wrote), missing (current files that are absent), retired, compactions,
  zero_byte, manifest_rows (rows of the current files), pending,
  status_counts (after.status where present), sample (the newest after image per table),
  types (per table, the Arrow type of each `after` field), state (per table directory, the
  rows a fold of its changes leaves: the newest `after` per Kafka key, deletes removing it).

With Delta tables in the lake, `delta` reads each one with the `deltalake` package (a second
independent reader, through the Delta log only): tables, files, rows, coords, duplicates
(offsets twice in a snapshot), missing (log entries whose file is absent), unlisted (snapshot
files no commit or compaction wrote), unpublished (current files of a Delta table its snapshot
lacks), and per table its version and txn versions.

Usage: lake_check.py --dir PATH | --s3 ENDPOINT BUCKET PREFIX
"""
import collections
import json
import os
import re
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
        delta_options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                         "AWS_ALLOW_HTTP": "true"}
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    objects = {i.path: i.size for i in infos if i.type == pafs.FileType.File}
    # Delta checkpoints are Parquet too; a glob over the data skips `_delta_log/`.
    data = {p: s for p, s in objects.items() if p.endswith(".parquet") and "/_delta_log/" not in p}
    manifests = [p for p in objects if "/_manifest/" in p and p.endswith(".json")]
    # listed: every file a commit or a compaction wrote; current_files: what holds the rows after
    # the compactions (`_compactions/<topic>/<partition>/<sequence>.json`, applied in order).
    listed, current_files, pending = set(), {}, 0
    for m in manifests:
        if m.endswith("_pending.json"):
            pending += 1
            continue
        with fs.open_input_stream(m) as f:
            commit = json.loads(f.read())
        for entry in commit["files"]:
            listed.add(f"{store_root}/{entry['path']}")
            current_files[f"{store_root}/{entry['path']}"] = entry
    compactions = sorted(p for p in objects if "/_compactions/" in p
                         and re.search(r"/[0-9]{20}\.json$", p))
    for c in compactions:
        with fs.open_input_stream(c) as f:
            record = json.loads(f.read())
        for r in record["replacements"]:
            for old in r["replaces"]:
                current_files.pop(f"{store_root}/{old['path']}")
            new = f"{store_root}/{r['file']['path']}"
            current_files[new] = r["file"]
            listed.add(new)
    manifest_rows = sum(e["rows"] for e in current_files.values())
    # Replaced files a compaction keeps until its retention ends: a plain glob sees their rows
    # twice; the glob read below leaves them out and reports them.
    retired = sorted(p for p in data if p in listed and p not in current_files)
    coords, seen, dups = [], collections.Counter(), 0
    status = collections.Counter()
    sample = {}
    types = {}  # table -> after field -> Arrow type, from the first file that has the field
    changes = collections.defaultdict(list)  # table directory -> (partition, offset, key, op, after)
    rows = 0
    for path in sorted(set(data) - set(retired)):
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
        folded = {}
        # One partition per key: Kafka order within the partition is the change order.
        for _, _, key, op, after in sorted(rows_of, key=lambda r: (r[0], r[1])):
            if key is None or op not in ("c", "u", "r", "d"):
                continue
            k = json.loads(key)
            if isinstance(k, dict) and "payload" in k and "schema" in k:
                k = k["payload"]
            k = json.dumps(k, sort_keys=True)
            if op == "d":
                folded.pop(k, None)
            else:
                folded[k] = finite(json.loads(json.dumps(after, default=str)))
        state[directory] = folded
    report = {
        "files": len(data),
        "current_files": sum(1 for p in current_files if p in data),
        "rows": rows,
        "coords": coords,
        "duplicates": dups,
        "unlisted": sorted(p for p in data if p not in listed),
        "missing": sorted(p for p in current_files if p not in data),
        "retired": retired,
        "compactions": len(compactions),
        "zero_byte": sum(1 for s in data.values() if s == 0),
        "manifest_rows": manifest_rows,
        "pending": pending,
        "status_counts": dict(status),
        "sample": {t: a for t, (_, a) in sample.items()},
        "types": types,
        "state": state,
    }
    delta_roots = sorted({p.split("/_delta_log/")[0] for p in objects if "/_delta_log/" in p})
    if delta_roots:
        local = sys.argv[1] == "--dir"
        report["delta"] = delta_report(
            delta_roots, set(data), listed, set(current_files), local, None if local else delta_options)
        # Tables whose directory the lake had to escape get no Delta log yet
        # (DeltaLog::covers): their coordinates, so a checker can account for every offset.
        uncovered = []
        for p in sorted(current_files):
            if "%" in p.split("/cdc_events/")[1].split("/date=")[0] and p in data:
                t = pq.read_table(p, filesystem=fs, columns=["kafka_topic", "kafka_partition", "kafka_offset"])
                uncovered += [[r["kafka_topic"], r["kafka_partition"], r["kafka_offset"]] for r in t.to_pylist()]
        report["delta"]["uncovered_coords"] = uncovered
    print(json.dumps(finite(report), allow_nan=False))
    sys.stdout.flush()
    # deltalake's runtime aborts at interpreter exit ("terminate called without an active
    # exception"); the report is out, so leave without the teardown.
    os._exit(0)


def delta_report(roots, data, listed, current_files, local, options):
    from deltalake import DeltaTable

    out = {"tables": {}, "files": 0, "rows": 0, "coords": [], "duplicates": 0, "missing": [],
           "unlisted": [], "unpublished": []}
    seen = collections.Counter()
    for root in roots:
        uri = root if local else f"s3://{root}"
        dt = DeltaTable(uri, storage_options=options)
        files = [u[len("s3://"):] if u.startswith("s3://") else u for u in dt.file_uris()]
        out["files"] += len(files)
        out["missing"] += [f for f in files if f not in data]
        out["unlisted"] += [f for f in files if f not in listed]
        out["unpublished"] += sorted(
            p for p in current_files if p.startswith(root + "/") and p not in set(files))
        t = dt.to_pyarrow_table(columns=["kafka_topic", "kafka_partition", "kafka_offset"])
        out["rows"] += t.num_rows
        for rec in t.to_pylist():
            c = (rec["kafka_topic"], rec["kafka_partition"], rec["kafka_offset"])
            seen[c] += 1
            out["coords"].append(list(c))
        out["tables"][root.split("/cdc_events/")[1]] = {
            "version": dt.version(),
            "files": len(files),
            "rows": t.num_rows,
            "columns": [f.name for f in dt.schema().fields],
        }
    out["duplicates"] = sum(n - 1 for n in seen.values() if n > 1)
    return out


if __name__ == "__main__":
    main()
