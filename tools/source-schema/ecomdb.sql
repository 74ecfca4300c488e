-- The seeds' bookstore schema, source side (ecomdb). Debezium captures every table here.
CREATE TABLE IF NOT EXISTS books (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    title text NOT NULL,
    author text,
    price numeric(10,2),
    description text,
    cover_url text,
    isbn text,
    genre text,
    published_year int,
    created_at timestamp DEFAULT now()
);
CREATE TABLE IF NOT EXISTS orders (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id text NOT NULL,
    total numeric(10,2) NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'PENDING',
    created_at timestamp DEFAULT now()
);
CREATE TABLE IF NOT EXISTS order_items (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    order_id uuid NOT NULL,
    book_id uuid NOT NULL,
    quantity int NOT NULL,
    price_at_purchase numeric(10,2) NOT NULL
);
-- Long reviewer notes: large enough to be TOASTed, so Debezium sends its "unavailable" placeholder
-- when another column of the row changes (default replica identity).
CREATE TABLE IF NOT EXISTS book_notes (
    id serial PRIMARY KEY,
    book_title text,
    note text,
    revision int NOT NULL DEFAULT 1
);
