"""Round-trip check of the type zoo: source database vs mirror vs lake, column by column.

Every value is brought to one canonical text per kind of column (exact decimal text, float
repr, JSON with sorted keys, bytes as hex, temporal values as integers in microseconds or days
with ±infinity spelled out) and compared. The lake is read with pyarrow, independently of
cdc-lake's own code; temporal Arrow columns are read as their raw integers.

What the connector itself cannot carry is stated per setting in LOSSES and applied to the
source side, so a mismatch always means cdc-lake changed a value:
- defaults (precise decimals): Debezium sends null for numeric NaN and ±Infinity;
- seed (double decimals, connect time): decimals become doubles, times and timestamps lose
  their microseconds, and schemaless JSON cannot say that a number is a date or an interval,
  so the mirror keeps Debezium's numbers (days, milliseconds, microseconds) and bytea stays
  base64 text;
- strings (schemaless, string decimals, adaptive_time_microseconds, hex binary): decimals are
  exact text, times microseconds, timestamp(3) milliseconds, bytea hex text.

Usage:
  check.py --dump-source URL                     # canonical source rows, both settings (JSON)
  check.py --format seed|schema|strings (--source URL | --expected FILE)
           --mirror URL [--mirror-schema S] [--lake-dir DIR | --lake-s3 ENDPOINT BUCKET PREFIX]
Prints {"compared": {...}, "mismatches": [...]}.
"""
import argparse
import base64
import datetime
import json
import re
import sys
import decimal
from decimal import Decimal

import struct
import psycopg2
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# numeric holds far more than the default 28 significant digits.
decimal.getcontext().prec = 1000

# Debezium's encodings of PostgreSQL ±infinity, and the extremes cdc-lake writes to the lake.
TS_INF = {9223372036825200000: "infinity", -9223372036832400000: "-infinity",
          2**63 - 1: "infinity", -(2**63 - 1): "-infinity"}
DATE_INF = {-2147472692: "infinity", -2147472691: "-infinity",
            2**31 - 1: "infinity", -(2**31 - 1): "-infinity"}

FINITE_MICROS = ("CASE WHEN isfinite({c}) THEN (extract(epoch FROM {c}) * 1000000)::bigint::text "
                 "ELSE {c}::text END")
FINITE_MILLIS_AS_MICROS = ("CASE WHEN isfinite({c}) THEN (floor(extract(epoch FROM {c}) * 1000) * 1000)"
                           "::bigint::text ELSE {c}::text END")
DAYS = "CASE WHEN isfinite({c}) THEN ({c} - date '1970-01-01')::text ELSE {c}::text END"
TIME_MICROS = "(extract(epoch FROM {c}) * 1000000)::bigint::text"
TIME_MILLIS_AS_MICROS = "(floor(extract(epoch FROM {c}) * 1000) * 1000)::bigint::text"
TIMETZ_MICROS = "(extract(epoch FROM ({c} AT TIME ZONE 'UTC')::time) * 1000000)::bigint::text"
# Debezium's MicroDuration counts a month as 365.25 / 12 = 30.4375 days.
MICRODURATION = ("round(((date_part('year', {c}) * 12 + date_part('month', {c})) * 30.4375 "
                 "+ date_part('day', {c})) * 86400000000 + date_part('hour', {c}) * 3600000000 "
                 "+ date_part('minute', {c}) * 60000000 + date_part('second', {c}) * 1000000)::bigint::text")
TEXT = "{c}::text"
# The type's output function, as Debezium sees it: char(n) keeps its padding.
PADDED = "CASE WHEN {c} IS NOT NULL THEN format('%s', {c}) END"
TO_JSON = "to_jsonb({c})::text"
HEX = "encode({c}, 'hex')"
FLOAT8 = "{c}::float8::text"

# column: (kind, source SQL under Debezium's defaults, under the seeds' settings,
#          factor turning the seeds' wire integer into canonical micros)
TYPE_ZOO = {
    "c_bool": ("bool", TEXT, TEXT, 1),
    "c_int2": ("int", TEXT, TEXT, 1),
    "c_int4": ("int", TEXT, TEXT, 1),
    "c_int8": ("int", TEXT, TEXT, 1),
    "c_float4": ("float4", TEXT, TEXT, 1),
    "c_float8": ("float8", TEXT, TEXT, 1),
    "c_numeric": ("decimal", TEXT, FLOAT8, 1),
    "c_numeric_free": ("decimal", TEXT, FLOAT8, 1),
    "c_numeric_wide": ("decimal", TEXT, FLOAT8, 1),
    "c_money": ("decimal", "{c}::numeric::text", "{c}::numeric::float8::text", 1),
    "c_text": ("text", TEXT, TEXT, 1),
    "c_varchar": ("text", TEXT, TEXT, 1),
    "c_char": ("text", PADDED, PADDED, 1),
    "c_uuid": ("text", TEXT, TEXT, 1),
    "c_json": ("json", TEXT, TEXT, 1),
    "c_jsonb": ("json", TEXT, TEXT, 1),
    "c_enum": ("text", TEXT, TEXT, 1),
    "c_int_array": ("json", TO_JSON, TO_JSON, 1),
    "c_text_array": ("json", TO_JSON, TO_JSON, 1),
    "c_interval": ("micros", MICRODURATION, MICRODURATION, 1),
    "c_bytea": ("hex", HEX, HEX, 1),
    "c_inet": ("text", PADDED, PADDED, 1),  # inet::text always adds the netmask
    "c_date": ("days", DAYS, DAYS, 1),
    "c_time": ("micros", TIME_MICROS, TIME_MILLIS_AS_MICROS, 1000),
    "c_time_ms": ("micros", TIME_MICROS, TIME_MILLIS_AS_MICROS, 1000),
    "c_timetz": ("micros", TIMETZ_MICROS, TIMETZ_MICROS, 1),
    "c_timestamp": ("micros", FINITE_MICROS, FINITE_MILLIS_AS_MICROS, 1000),
    "c_timestamp_ms": ("micros", FINITE_MICROS, FINITE_MILLIS_AS_MICROS, 1000),
    "c_timestamptz": ("micros", FINITE_MICROS, FINITE_MICROS, 1),
    "c_big_text": ("text", TEXT, TEXT, 1),
}
TABLES = {
    "type_zoo": ("id", TYPE_ZOO),
    "zoo_truncated": ("id", {"note": ("text", TEXT, TEXT, 1)}),
    "zoo_nokey": ("sku", {"qty": ("int", TEXT, TEXT, 1)}),
    "zoo_json": ("id", {"doc": ("json", TEXT, TEXT, 1)}),
}
# What Debezium cannot carry under a setting, applied to the source side (see the docstring).
LOSSES = {
    "schema": {("type_zoo", "c_numeric_free"): "CASE WHEN {c} IN ('NaN', 'Infinity', '-Infinity') "
                                               "THEN NULL ELSE {c}::text END"},
    "seed": {},
    "strings": {},
}
FORMATS = ("schema", "seed", "strings")


def source_sql(fmt, table, col, spec):
    """The source-side SQL of a column under a setting: the strings setting keeps every value
    Debezium's defaults keep (exact decimals, microsecond times), only the encoding differs."""
    return LOSSES[fmt].get((table, col)) or (spec[2] if fmt == "seed" else spec[1])


def wire_factor(fmt, col, spec):
    """What turns a schemaless wire integer of a temporal column into canonical micros."""
    if fmt == "seed":
        return spec[3]
    if fmt == "strings" and col == "c_timestamp_ms":
        return 1000  # adaptive: timestamp(3) is milliseconds
    return 1


DEBEZIUM_STRING_SPECIALS = {"NAN": "NaN", "POSITIVE_INFINITY": "Infinity", "NEGATIVE_INFINITY": "-Infinity"}


def canonical(kind, v):
    """One text per value of a kind, from PostgreSQL text or a pyarrow Python object."""
    if v is None:
        return None
    if kind == "bool":
        return str(v).lower()
    if kind == "int":
        return str(int(v))
    if kind in ("float4", "float8"):
        f = float(v)
        return repr(struct.unpack("f", struct.pack("f", f))[0]) if kind == "float4" else repr(f)
    if kind == "decimal":
        # decimal.handling.mode=string spells the special values as Java's enum names.
        v = DEBEZIUM_STRING_SPECIALS.get(v, v) if isinstance(v, str) else v
        d = Decimal(repr(v)) if isinstance(v, float) else Decimal(str(v))
        if d.is_nan() or d.is_infinite():
            return str(d)
        return format(d.normalize(), "f")
    if kind == "json":
        doc = json.loads(v) if isinstance(v, str) else v
        return json.dumps(doc, sort_keys=True, ensure_ascii=False)
    if kind == "hex":
        return bytes(v).hex() if isinstance(v, (bytes, bytearray, memoryview)) else v
    if kind in ("micros", "days"):
        inf = DATE_INF if kind == "days" else TS_INF
        if isinstance(v, str) and not re.fullmatch(r"-?\d+", v):
            return v
        return inf.get(int(v), str(int(v)))
    return v


def wire_temporal(text, factor):
    """The seeds' schemaless text/number for a temporal column, as canonical micros: ISO
    timestamps and ZonedTime strings are parsed; integers are scaled to microseconds."""
    if text is None:
        return None
    if re.fullmatch(r"-?\d+", text):
        n = int(text)
        return str(n) if n in TS_INF or n in DATE_INF else str(n * factor)
    if text in ("infinity", "-infinity"):
        return text
    if re.fullmatch(r"\d\d:\d\d:\d\d(\.\d+)?Z", text):
        t = datetime.time.fromisoformat(text[:-1])
        return str(((t.hour * 60 + t.minute) * 60 + t.second) * 1000000 + t.microsecond)
    dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return str((dt - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(microseconds=1))


def connect(url):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as c:
        c.execute("SET TimeZone = 'UTC'")
    return conn


def source_rows(url, fmt):
    out = {}
    conn = connect(url)
    for table, (key, cols) in TABLES.items():
        exprs = []
        for col, spec in cols.items():
            exprs.append(source_sql(fmt, table, col, spec).format(c=f'"{col}"'))
        with conn.cursor() as c:
            c.execute(f'SELECT "{key}"::text, {", ".join(exprs)} FROM public."{table}"')
            out[table] = {
                r[0]: {col: canonical(spec[0], v) for (col, spec), v in zip(cols.items(), r[1:])}
                for r in c.fetchall()
            }
    conn.close()
    return out


def mirror_expr(col, spec, data_type, fmt):
    kind = spec[0]
    c = f'"{col}"'
    if kind in ("micros", "days"):
        by_type = {
            "date": DAYS, "time without time zone": TIME_MICROS, "time with time zone": TIMETZ_MICROS,
            "timestamp without time zone": FINITE_MICROS, "timestamp with time zone": FINITE_MICROS,
            "interval": "(extract(epoch FROM {c}) * 1000000)::bigint::text",
        }
        return by_type.get(data_type, TEXT).format(c=c)
    if kind == "hex":
        if data_type == "bytea":
            return HEX.format(c=c)
        # Schemaless bytea is the wire text: hex already, or base64.
        return (TEXT if fmt == "strings" else "encode(decode({c}, 'base64'), 'hex')").format(c=c)
    if data_type == "ARRAY":
        return TO_JSON.format(c=c)
    return TEXT.format(c=c)


def mirror_rows(url, schema, fmt):
    out = {}
    conn = connect(url)
    for table, (key, cols) in TABLES.items():
        with conn.cursor() as c:
            c.execute("SELECT column_name, data_type FROM information_schema.columns "
                      "WHERE table_schema = %s AND table_name = %s", (schema, table))
            types = dict(c.fetchall())
            if not types:
                out[table] = None
                continue
            exprs = [mirror_expr(col, spec, types.get(col, "text"), fmt) if col in types else "NULL"
                     for col, spec in cols.items()]
            deleted = " WHERE NOT cdc_deleted" if "cdc_deleted" in types else ""
            c.execute(f'SELECT "{key}"::text, {", ".join(exprs)} FROM "{schema}"."{table}"{deleted}')
            rows = {}
            for r in c.fetchall():
                row = {}
                for (col, spec), v in zip(cols.items(), r[1:]):
                    if spec[0] in ("micros", "days") and types.get(col) in ("bigint", "integer", "text"):
                        v = wire_temporal(v, wire_factor(fmt, col, spec))
                    row[col] = canonical(spec[0], v)
                rows[r[0]] = row
            out[table] = rows
    conn.close()
    return out


def lake_value(col, spec, arr_type, v, fmt):
    kind = spec[0]
    if v is None:
        return None
    if kind in ("micros", "days"):
        if pa.types.is_timestamp(arr_type) or pa.types.is_time(arr_type) or pa.types.is_duration(arr_type):
            unit = {"s": 1000000, "ms": 1000, "us": 1, "ns": 0.001}[arr_type.unit]
            return canonical(kind, v if abs(v) >= 2**63 - 1 else int(v * unit))
        if pa.types.is_date32(arr_type):
            return canonical(kind, v)
        return canonical(kind, wire_temporal(str(v), wire_factor(fmt, col, spec)))
    if kind == "hex" and isinstance(v, str):
        return v.lower() if fmt == "strings" else base64.b64decode(v).hex()
    return canonical(kind, v)


def placeholders(envelope):
    doc = json.loads(envelope)
    after = (doc.get("payload", doc) if "schema" in doc else doc).get("after") or {}
    return {c for c, v in after.items() if v == "__debezium_unavailable_value"}


def lake_rows(fs, root, fmt):
    out = {}
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    # Data files only: a Delta table's checkpoints are Parquet files too, under _delta_log/.
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                   and "/_delta_log/" not in i.path)
    for table, (key, cols) in TABLES.items():
        events = []
        for path in files:
            if f"table=public.{table}/" not in path:
                continue
            t = pq.read_table(path, filesystem=fs)
            if "after" not in t.column_names:
                # Rowless changes only (a schemaless truncate): no before/after columns.
                src = t.column("source").to_pylist()
                for i, (op, off) in enumerate(zip(t.column("op").to_pylist(),
                                                  t.column("kafka_offset").to_pylist())):
                    order = (src[i]["commit_lsn"] or 0, src[i]["lsn"] or 0, off)
                    events.append((order, op, None, {}))
                continue
            after_type = t.schema.field("after").type
            # Temporal columns as their raw integers (pyarrow's datetime cannot hold ±infinity).
            after = t.column("after").combine_chunks()
            before = t.column("before").combine_chunks()
            fields = {}
            for i in range(after_type.num_fields):
                f = after_type.field(i)
                arr = pc.struct_field(after, [i])
                if pa.types.is_temporal(f.type) and not pa.types.is_date32(f.type):
                    arr = arr.view(pa.int64()) if not pa.types.is_time32(f.type) else arr.view(pa.int32())
                elif pa.types.is_date32(f.type):
                    arr = arr.view(pa.int32())
                fields[f.name] = (f.type, arr.to_pylist())
            # A Delta table's file stores a column whose type changed (schemaless "NaN" after
            # numbers) as `<name>__<Delta type>`, a column of its own (lake/README.md).
            for name in list(fields):
                base = name.rsplit("__", 1)[0]
                if base != name and base in cols and base not in fields:
                    fields[base] = fields[name]
            key_after = fields[key][1] if key in fields else [None] * t.num_rows
            key_before = pc.struct_field(before, [before.type.get_field_index(key)]).to_pylist() \
                if before.type.get_field_index(key) >= 0 else [None] * t.num_rows
            # A TOAST placeholder is null in the typed row; the verbatim envelope says which
            # columns it replaced, and those keep their earlier value.
            unchanged = [placeholders(e) for e in t.column("envelope").to_pylist()]
            src = t.column("source").to_pylist()
            ops = t.column("op").to_pylist()
            offsets = t.column("kafka_offset").to_pylist()
            for i in range(t.num_rows):
                order = (src[i]["commit_lsn"] or 0, src[i]["lsn"] or 0, offsets[i])
                row = {c: lake_value(c, spec, fields[c][0], fields[c][1][i], fmt) if c in fields else None
                       for c, spec in cols.items() if c not in unchanged[i]}
                k = key_after[i] if key_after[i] is not None else key_before[i]
                events.append((order, ops[i], None if k is None else str(k), row))
        state = {}
        for _, op, k, row in sorted(events, key=lambda e: e[0]):
            if op == "t":
                state.clear()
            elif op == "d":
                state.pop(k, None)
            elif op in ("r", "c", "u"):
                state[k] = {**state.get(k, {}), **{c: v for c, v in row.items()}}
        out[table] = state if events else None
    return out


# Where the mirror cannot hold a value, stated rather than hidden: jsonb_populate_record turns a
# JSON `null` document into SQL NULL, so a json/jsonb column holding the document `null` reads
# back as NULL from the mirror (the lake keeps "null").
MIRROR_LIMITS = {("json", "null"): None}


def compare(name, expected, actual, mismatches, compared, skip=()):
    for table, rows in expected.items():
        rows = {k: r for k, r in rows.items() if f"{table}:{k}" not in skip}
        got = actual.get(table)
        if got is None:
            mismatches.append({"where": name, "table": table, "problem": "table missing"})
            continue
        for k in sorted(set(rows) | set(got)):
            if k not in got or k not in rows:
                mismatches.append({"where": name, "table": table, "key": k,
                                   "problem": "row missing" if k not in got else "unexpected row"})
                continue
            kinds = {c: spec[0] for c, spec in TABLES[table][1].items()}
            for col, want in rows[k].items():
                compared[name] = compared.get(name, 0) + 1
                if name == "mirror" and got[k].get(col) is None and (kinds[col], want) in MIRROR_LIMITS:
                    want = MIRROR_LIMITS[(kinds[col], want)]
                if got[k].get(col) != want:
                    mismatches.append({"where": name, "table": table, "key": k, "column": col,
                                       "source": want, name: got[k].get(col)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump-source")
    ap.add_argument("--format", choices=list(FORMATS))
    ap.add_argument("--source")
    ap.add_argument("--expected")
    ap.add_argument("--mirror")
    ap.add_argument("--mirror-schema", default="cdc_processed")
    ap.add_argument("--skip-mirror-row", action="append", default=[], metavar="TABLE:KEY",
                    help="a row the mirror is expected to reject (asserted by the caller)")
    ap.add_argument("--lake-dir")
    ap.add_argument("--lake-s3", nargs=3, metavar=("ENDPOINT", "BUCKET", "PREFIX"))
    a = ap.parse_args()
    if a.dump_source:
        print(json.dumps({fmt: source_rows(a.dump_source, fmt) for fmt in FORMATS},
                         indent=1, ensure_ascii=False, sort_keys=True))
        return
    expected = source_rows(a.source, a.format) if a.source else json.load(open(a.expected))[a.format]
    mismatches, compared = [], {}
    if a.mirror:
        compare("mirror", expected, mirror_rows(a.mirror, a.mirror_schema, a.format), mismatches, compared,
                a.skip_mirror_row)
    if a.lake_dir or a.lake_s3:
        if a.lake_dir:
            fs, root = pafs.LocalFileSystem(), a.lake_dir.rstrip("/")
        else:
            endpoint, bucket, prefix = a.lake_s3
            scheme, host = endpoint.split("://")
            fs = pafs.S3FileSystem(endpoint_override=host, scheme=scheme, access_key="testing",
                                   secret_key="testing", region="us-east-1")
            root = f"{bucket}/{prefix}".rstrip("/")
        compare("lake", expected, lake_rows(fs, root, a.format), mismatches, compared)
    print(json.dumps({"compared": compared, "mismatches": mismatches}, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
