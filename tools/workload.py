"""Bookstore workload against the source databases, shaped like the seeds' app.

Seeds books (up to --books) and their inventory, then runs rounds of: place an order with 1-3 items (one
transaction), advance order statuses, cancel orders (half of them losing an item), change book
prices, and move inventory (reserve, restock). Every change flows through Debezium to Kafka.

Usage: workload.py --ops N [--port 55432] [--seed S] [--rate R] [--ecomdb DB --inventorydb DB]
"""
import argparse
import random
import sys
import time
import uuid

import psycopg2

GENRES = ["SciFi", "Classic", "Fantasy", "Mystery", "History"]
STATUSES = ["CONFIRMED", "SHIPPED", "DELIVERED"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=200, help="number of workload steps")
    ap.add_argument("--port", type=int, default=55432)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--rate", type=float, default=0, help="steps per second (0 = as fast as possible)")
    ap.add_argument("--books", type=int, default=20)
    ap.add_argument("--ecomdb", default="ecomdb", help="database with books, orders, order_items")
    ap.add_argument("--inventorydb", default="inventorydb", help="database with inventory")
    args = ap.parse_args()
    rnd = random.Random(args.seed)

    ecom = psycopg2.connect(host=args.host, port=args.port, user="postgres", dbname=args.ecomdb)
    inv = psycopg2.connect(host=args.host, port=args.port, user="postgres", dbname=args.inventorydb)
    ec, ic = ecom.cursor(), inv.cursor()

    ec.execute("SELECT id::text, price FROM books")
    books = ec.fetchall()
    if len(books) < args.books:
        # Top up to --books (other tools leave a few marker books behind).
        for i in range(len(books), args.books):
            bid = str(uuid.UUID(int=rnd.getrandbits(128)))
            price = round(rnd.uniform(5, 40), 2)
            ec.execute(
                "INSERT INTO books (id, title, author, price, description, isbn, genre, published_year) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                (bid, f"Book {i}", f"Author {i % 7}", price, "A fine book " * rnd.randint(1, 4),
                 f"978{rnd.randrange(10**9, 10**10)}", rnd.choice(GENRES), rnd.randint(1900, 2025)))
            ic.execute("INSERT INTO inventory (book_id, quantity, reserved) VALUES (%s,%s,0) "
                       "ON CONFLICT DO NOTHING", (bid, rnd.randint(10, 100)))
            books.append((bid, price))
        ecom.commit(); inv.commit()

    counts = {"orders": 0, "status_updates": 0, "cancels": 0, "inventory_moves": 0, "price_changes": 0}
    open_orders = []
    for step in range(args.ops):
        t0 = time.time()
        r = rnd.random()
        if r < 0.45 or not open_orders:
            oid = str(uuid.UUID(int=rnd.getrandbits(128)))
            items = rnd.sample(books, rnd.randint(1, min(3, len(books))))
            qty = [rnd.randint(1, 3) for _ in items]
            total = sum(float(p) * q for (_, p), q in zip(items, qty))
            ec.execute("INSERT INTO orders (id, user_id, total, status) VALUES (%s,%s,%s,'CONFIRMED')",
                       (oid, f"keycloak-user-{rnd.randint(1, 50)}", round(total, 2)))
            for (bid, price), q in zip(items, qty):
                ec.execute("INSERT INTO order_items (order_id, book_id, quantity, price_at_purchase) "
                           "VALUES (%s,%s,%s,%s)", (oid, bid, q, price))
                ic.execute("UPDATE inventory SET reserved = reserved + %s, updated_at = now() WHERE book_id = %s",
                           (q, bid))
            ecom.commit(); inv.commit()
            open_orders.append(oid)
            counts["orders"] += 1
        elif r < 0.75:
            oid = rnd.choice(open_orders)
            ec.execute("SELECT status FROM orders WHERE id = %s", (oid,))
            row = ec.fetchone()
            nxt = STATUSES[min(STATUSES.index(row[0]) + 1, len(STATUSES) - 1)] if row and row[0] in STATUSES else None
            if nxt:
                ec.execute("UPDATE orders SET status = %s WHERE id = %s", (nxt, oid))
                counts["status_updates"] += 1
            if nxt == "DELIVERED":
                open_orders.remove(oid)
            ecom.commit()
        elif r < 0.85:
            oid = open_orders.pop(rnd.randrange(len(open_orders)))
            ec.execute("UPDATE orders SET status = 'CANCELLED' WHERE id = %s", (oid,))
            if rnd.random() < 0.5:
                ec.execute("DELETE FROM order_items WHERE id = (SELECT id FROM order_items WHERE order_id = %s LIMIT 1)", (oid,))
            ecom.commit()
            counts["cancels"] += 1
        elif r < 0.95:
            bid, _ = rnd.choice(books)
            ic.execute("INSERT INTO inventory (book_id, quantity, reserved) VALUES (%s,%s,0) "
                       "ON CONFLICT (book_id) DO UPDATE SET quantity = inventory.quantity + EXCLUDED.quantity, "
                       "updated_at = now()", (bid, rnd.randint(1, 20)))
            inv.commit()
            counts["inventory_moves"] += 1
        else:
            i = rnd.randrange(len(books))
            bid, _ = books[i]
            price = round(rnd.uniform(5, 40), 2)
            ec.execute("UPDATE books SET price = %s WHERE id = %s", (price, bid))
            ecom.commit()
            books[i] = (bid, price)
            counts["price_changes"] += 1
        if args.rate:
            time.sleep(max(0.0, 1.0 / args.rate - (time.time() - t0)))
    print("workload:", ", ".join(f"{k}={v}" for k, v in counts.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
