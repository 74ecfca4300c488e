"""Reads one Delta table of the lake with the `deltalake` package, at its latest version or at
the version or timestamp given: an independent reader of the Delta log (time travel included).

Prints one JSON object: schema (the Delta schema as JSON), rows (with `--rows yes`: every row
but the partition column, as sorted JSON text, per offset), version, coords ([topic, partition, offset] per row), columns (the
table's top-level columns), after_columns (the fields of `after`), notes (per offset, the value
of `after.note` where the table has that column), txn (the txn version of each
`cdc-lake/<topic>/<partition>` app id named with --app).

Usage: delta_read.py TABLE_URI [--version N | --as-of ISO8601] [--s3-endpoint URL] [--app ID]... [--rows yes]
"""
import json
import os
import sys


def main():
    from deltalake import DeltaTable

    args = sys.argv[1:]
    uri = args.pop(0)
    version, as_of, options, apps, rows_wanted = None, None, None, [], False
    while args:
        flag, value = args.pop(0), args.pop(0)
        if flag == "--version":
            version = int(value)
        elif flag == "--as-of":
            as_of = value
        elif flag == "--s3-endpoint":
            options = {"AWS_ENDPOINT_URL": value, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                       "AWS_ALLOW_HTTP": "true"}
        elif flag == "--app":
            apps.append(value)
        elif flag == "--rows":
            rows_wanted = value == "yes"
    dt = DeltaTable(uri, storage_options=options)
    if version is not None:
        dt.load_as_version(version)
    elif as_of is not None:
        dt.load_as_version(as_of)
    fields = {f.name: f for f in dt.schema().fields}
    after_columns = []
    if "after" in fields:
        after_columns = [f.name for f in fields["after"].type.fields]
    t = dt.to_pyarrow_table(columns=["kafka_topic", "kafka_partition", "kafka_offset"]
                            + (["after"] if "note" in after_columns else []))
    rows = t.to_pylist()
    notes = {}
    if "note" in after_columns:
        notes = {str(r["kafka_offset"]) + "@" + str(r["kafka_partition"]):
                 (r["after"] or {}).get("note") for r in rows}
    everything = {}
    if rows_wanted:
        full = dt.to_pyarrow_table(columns=[f for f in fields if f != "date"]).to_pylist()
        everything = {str(r["kafka_offset"]) + "@" + str(r["kafka_partition"]):
                      json.dumps(r, default=str, sort_keys=True) for r in full}
    print(json.dumps({
        "schema": dt.schema().to_json(),
        "rows": everything,
        "version": dt.version(),
        "coords": [[r["kafka_topic"], r["kafka_partition"], r["kafka_offset"]] for r in rows],
        "columns": list(fields),
        "after_columns": after_columns,
        "notes": notes,
        "txn": {a: dt.transaction_version(a) for a in apps},
    }))
    sys.stdout.flush()
    os._exit(0)  # deltalake's runtime aborts at interpreter exit


if __name__ == "__main__":
    main()
