"""Checks cdc-lake's Superset dashboards against the analytics views and the source databases.

For every chart of deploy/superset/bundle, the chart-data API (/api/v1/chart/{id}/data/, the
chart's saved query_context, cache bypassed) must return exactly what the same question returns
when asked of the analytics view directly, and what it returns when asked of the source
databases (ecomdb and inventorydb, where Debezium reads). The source answers are computed here,
from the source tables, never from anything cdc-lake or Superset wrote.

With --wrong-view, one view is then replaced by a plausible bug (revenue that forgets the
quantity) and the check must fail for the chart that reads it; the view is restored afterwards.

  python tools/superset_check.py [--wrong-view]
"""
import argparse
import datetime as dt
import json
import os
import sys
import time
import urllib.request
from decimal import ROUND_HALF_UP, Decimal

import psycopg2

SUPERSET = f"http://127.0.0.1:{os.environ.get('SUPERSET_PORT', '18088')}"
STATE = os.environ.get("CDC_LAKE_RUN", "/tmp/cdc-lake-run") + "/superset"
ANALYTICS = os.environ.get("CDC_LAKE_ANALYTICS_URL", "postgres://postgres@127.0.0.1:5432/cdc_analytics")
SOURCE_PORT = int(os.environ.get("SOURCE_PG_PORT", "55432"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def norm(v):
    """One comparable form per value: numbers to 2 decimals, dates as ISO days."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float, Decimal)):
        return f"{Decimal(str(v)).quantize(Decimal('0.01'))}"
    if isinstance(v, (dt.date, dt.datetime)):
        return v.isoformat()[:10]
    return str(v)


def rows(result, ordered=False):
    out = [tuple(norm(v) for v in r) for r in result]
    return out if ordered else sorted(out, key=repr)


# ---- the source side: the seeds' bookstore, read where Debezium reads it -----------------------
class Source:
    def __init__(self):
        ecom = psycopg2.connect(host="127.0.0.1", port=SOURCE_PORT, user="postgres", dbname="ecomdb")
        inv = psycopg2.connect(host="127.0.0.1", port=SOURCE_PORT, user="postgres", dbname="inventorydb")
        self.ecom, self.inv = ecom.cursor(), inv.cursor()
        self._books = None

    def q(self, cur, sql):
        cur.execute(sql)
        return cur.fetchall()

    def refresh(self):
        self._books = None

    def books(self):
        """id -> (title, author, genre, price), read once per round of checks."""
        if self._books is None:
            self._books = {r[0]: r[1:] for r in
                           self.q(self.ecom, "SELECT id, title, author, genre, price FROM books")}
        return self._books

    def title(self, book_id):
        """The book's title, None for a book the source does not have."""
        return self.books().get(book_id, (None,))[0]

    def sold_items(self):
        """(book_id, quantity, price) of items whose order is not cancelled."""
        return self.q(self.ecom, """SELECT i.book_id, i.quantity, i.price_at_purchase
                                      FROM order_items i JOIN orders o ON o.id = i.order_id
                                     WHERE o.status <> 'CANCELLED'""")

    def inventory(self):
        """The rows the analytics mapping keeps (its filter: a book, no negative stock)."""
        return self.q(self.inv, """SELECT book_id, quantity, reserved FROM inventory
                                    WHERE book_id IS NOT NULL AND quantity >= 0""")


def group_sum(pairs):
    out = {}
    for k, v in pairs:
        out[k] = out.get(k, 0) + v
    return list(out.items())


def health(available):
    return "OUT_OF_STOCK" if available <= 0 else "LOW" if available < 10 else "OK"


def price_band(p):
    return "< 10" if p < 10 else "10-20" if p < 20 else "20-30" if p < 30 else "30-50" if p < 50 else "50+"


def top_books(s):
    revenue = group_sum((b, q * p) for b, q, p in s.sold_items())
    ranked = sorted(revenue, key=lambda kv: (-kv[1], str(kv[0])))[:10]
    return [(i + 1, s.title(b), r) for i, (b, r) in enumerate(ranked)]


def turnover(s):
    sold = dict(group_sum((b, q) for b, q, _ in s.sold_items()))
    return [(s.title(b), sold.get(b, 0), q, None if q == 0 else pg_round2(Decimal(sold.get(b, 0)) / q))
            for b, q, _ in s.inventory()]


def pg_round2(d):
    """PostgreSQL's round(numeric, 2): ties away from zero (Python's round() takes ties to even,
    so 25/40 = 0.625 came out 0.62 against the view's 0.63)."""
    return d.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


# Per chart: the question asked of its view, and the same question asked of the sources. The
# columns come in the chart's order; `ordered` charts are compared in order (a ranking).
CHECKS = {
    "Daily revenue": (
        "SELECT day, sum(revenue) FROM analytics.vw_sales_over_time GROUP BY day",
        lambda s: s.q(s.ecom, "SELECT created_at::date, sum(total) FROM orders WHERE status <> 'CANCELLED' GROUP BY 1")),
    "Orders per day": (
        "SELECT day, sum(orders) FROM analytics.vw_sales_over_time GROUP BY day",
        lambda s: s.q(s.ecom, "SELECT created_at::date, count(*) FROM orders WHERE status <> 'CANCELLED' GROUP BY 1")),
    "Revenue (excluding cancelled)": (
        "SELECT sum(revenue) FROM analytics.vw_avg_order_value",
        lambda s: s.q(s.ecom, "SELECT coalesce(sum(total), 0) FROM orders WHERE status <> 'CANCELLED'")),
    "Average order value": (
        "SELECT max(avg_order_value) FROM analytics.vw_avg_order_value",
        lambda s: s.q(s.ecom, "SELECT round(avg(total), 2) FROM orders WHERE status <> 'CANCELLED'")),
    "Orders by status": (
        "SELECT status, sum(orders) FROM analytics.vw_order_status_distribution GROUP BY status",
        lambda s: s.q(s.ecom, "SELECT status, count(*) FROM orders GROUP BY status")),
    "Top books by revenue": (
        "SELECT rank, title, revenue FROM analytics.vw_top_books_by_revenue ORDER BY rank",
        top_books),
    "Inventory health": (
        "SELECT health, count(*) FROM analytics.vw_inventory_health GROUP BY health",
        lambda s: group_sum((health(q - r), 1) for _, q, r in s.inventory())),
    "Stock available per book": (
        "SELECT title, sum(available) FROM analytics.vw_inventory_health GROUP BY title",
        lambda s: group_sum((s.title(b), q - r) for b, q, r in s.inventory())),
    "Inventory turnover": (
        "SELECT title, units_sold, on_hand, turnover FROM analytics.vw_inventory_turnover",
        turnover),
    "Books lowest in stock": (
        "SELECT title, available, health FROM analytics.vw_inventory_health ORDER BY available, title LIMIT 10",
        lambda s: sorted(((s.title(b), q - r, health(q - r)) for b, q, r in s.inventory()),
                         key=lambda t: (t[1], t[0] is None, t[0] or ""))[:10]),
    "Revenue by author": (
        "SELECT author, sum(revenue) FROM analytics.vw_revenue_by_author GROUP BY author",
        lambda s: group_sum(((s.books().get(b, (None, None))[1] or "(unknown)"), q * p)
                            for b, q, p in s.sold_items())),
    "Revenue by genre": (
        "SELECT genre, sum(revenue) FROM analytics.vw_revenue_by_genre GROUP BY genre",
        lambda s: group_sum(((s.books().get(b, (None, None, None))[2] or "(unknown)"), q * p)
                            for b, q, p in s.sold_items())),
    "Book price distribution": (
        "SELECT price_band, sum(books) FROM analytics.vw_book_price_distribution GROUP BY price_band",
        lambda s: group_sum((price_band(b[3]), 1) for b in s.books().values() if b[3] is not None)),
    "Units sold per book": (
        "SELECT title, sum(units_sold) FROM analytics.vw_product_sales_volume GROUP BY title",
        lambda s: group_sum((s.title(b), q) for b, q, _ in s.sold_items())),
}
ORDERED = {"Top books by revenue", "Books lowest in stock"}


# ---- Superset's side: the chart-data API ----------------------------------------------------------
def api(path, token=None, body=None):
    req = urllib.request.Request(SUPERSET + path, data=None if body is None else json.dumps(body).encode())
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def login():
    with open(f"{STATE}/admin-password", encoding="utf-8") as f:
        password = f.read().strip()
    return api("/api/v1/security/login", body={"username": "admin", "password": password,
                                               "provider": "db", "refresh": False})["access_token"]


def chart_ids(token):
    """The bundle's charts (by uuid, as imported) with their ids in this Superset."""
    listing = api("/api/v1/chart/?q=(page_size:100,columns:!(id,uuid))", token)
    by_uuid = {c["uuid"]: c["id"] for c in listing["result"]}
    ids = {}
    charts = os.path.join(REPO, "deploy/superset/bundle/charts")
    for name in sorted(os.listdir(charts)):
        with open(os.path.join(charts, name), encoding="utf-8") as f:
            fields = dict(line.rstrip("\n").split(": ", 1) for line in f
                          if line.startswith(("slice_name: ", "uuid: ")))
        if fields["uuid"] not in by_uuid:
            sys.exit(f"chart {fields['slice_name']!r} ({name}) is not in Superset: run tools/superset up")
        ids[fields["slice_name"].strip("'\"")] = by_uuid[fields["uuid"]]
    return ids


def chart_data(token, chart_id):
    result = api(f"/api/v1/chart/{chart_id}/data/?force=true", token)["result"][0]
    names = result["colnames"]
    data = []
    for r in result["data"]:
        values = []
        for n in names:
            v = r[n]
            # Temporal axis values come back as epoch milliseconds.
            if n == "day" and isinstance(v, (int, float)):
                v = dt.datetime.fromtimestamp(v / 1000, dt.timezone.utc).date()
            values.append(v)
        data.append(values)
    return data


def check(names, token, ids, analytics, source):
    failures = []
    source.refresh()
    for name in names:
        view_sql, from_source = CHECKS[name]
        ordered = name in ORDERED
        got = rows(chart_data(token, ids[name]), ordered)
        analytics.execute(view_sql)
        from_view = rows(analytics.fetchall(), ordered)
        expected = rows(from_source(source), ordered)
        # A check over no data proves nothing.
        if not any(v is not None for r in expected for v in r):
            failures.append(name)
            print(f"NO DATA {name}: the source databases hold nothing for it; run a workload first")
        elif got != from_view or got != expected:
            failures.append(name)
            print(f"MISMATCH {name}:\n  chart  {got[:6]}\n  view   {from_view[:6]}\n  source {expected[:6]}")
        else:
            print(f"ok  {name}: {len(got)} rows match the view and the source")
    return failures


WRONG_VIEW = """CREATE OR REPLACE VIEW analytics.vw_revenue_by_author AS
SELECT coalesce(b.author, '(unknown)') AS author,
       sum(i.price_at_purchase)        AS revenue,
       sum(i.quantity)::bigint         AS units_sold
  FROM analytics.fact_order_items i
  JOIN analytics.fact_orders o ON o.order_id = i.order_id AND o.status <> 'CANCELLED'
  LEFT JOIN analytics.dim_books b ON b.book_id = i.book_id
 GROUP BY 1"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wrong-view", action="store_true",
                    help="also check that a deliberately wrong view makes its chart fail")
    args = ap.parse_args()
    token = login()
    ids = chart_ids(token)
    if set(ids) != set(CHECKS):
        sys.exit(f"the bundle's charts {sorted(ids)} and the checked ones {sorted(CHECKS)} differ: "
                 "every chart needs its question here")
    conn = psycopg2.connect(ANALYTICS)
    conn.autocommit = True
    analytics = conn.cursor()
    source = Source()
    failures = check(list(CHECKS), token, ids, analytics, source)
    # A pod that is still running may not have applied the last source changes yet.
    deadline = time.monotonic() + 60
    while failures and time.monotonic() < deadline:
        time.sleep(3)
        print(f"checking {len(failures)} charts again")
        failures = check(failures, token, ids, analytics, source)
    if failures:
        sys.exit(f"{len(failures)} of {len(CHECKS)} charts do not match: {failures}")
    print(f"all {len(CHECKS)} charts match their views and the source databases")
    if args.wrong_view:
        try:
            analytics.execute(WRONG_VIEW)
            caught = check(["Revenue by author"], token, ids, analytics, source)
        finally:
            with open(os.path.join(REPO, "sql/analytics/bookstore.sql"), encoding="utf-8") as f:
                analytics.execute(f.read())
        if caught != ["Revenue by author"]:
            sys.exit("a wrong vw_revenue_by_author went unnoticed: the check cannot catch a bad view")
        print("a deliberately wrong vw_revenue_by_author was caught; the view is restored")


if __name__ == "__main__":
    main()
