-- The seeds' replica target (seed 002's postgres-target): the source tables as they are, plus
-- the operation, source commit time and apply time of each row's last change. cdc-lake fills
-- them through [targets.replica] in deploy/config/demo.toml (all_columns = true) and runs this
-- file whenever it opens the target. It adds one column of its own, __cdc_position (the
-- ordering guard). Columns mirror tools/source-schema/*.sql.
CREATE TABLE IF NOT EXISTS public.books (
    id uuid PRIMARY KEY,
    title text NOT NULL,
    author text,
    price numeric(10,2),
    description text,
    cover_url text,
    isbn text,
    genre text,
    published_year int,
    created_at timestamp,
    __cdc_operation text,
    __cdc_timestamp timestamptz,
    __synced_at timestamptz
);
CREATE TABLE IF NOT EXISTS public.orders (
    id uuid PRIMARY KEY,
    user_id text NOT NULL,
    total numeric(10,2) NOT NULL,
    status text NOT NULL,
    created_at timestamp,
    __cdc_operation text,
    __cdc_timestamp timestamptz,
    __synced_at timestamptz
);
CREATE TABLE IF NOT EXISTS public.order_items (
    id uuid PRIMARY KEY,
    order_id uuid NOT NULL,
    book_id uuid NOT NULL,
    quantity int NOT NULL,
    price_at_purchase numeric(10,2) NOT NULL,
    __cdc_operation text,
    __cdc_timestamp timestamptz,
    __synced_at timestamptz
);
CREATE TABLE IF NOT EXISTS public.book_notes (
    id int PRIMARY KEY,
    book_title text,
    note text,
    revision int NOT NULL,
    __cdc_operation text,
    __cdc_timestamp timestamptz,
    __synced_at timestamptz
);
CREATE TABLE IF NOT EXISTS public.inventory (
    book_id uuid PRIMARY KEY,
    quantity int NOT NULL,
    reserved int NOT NULL,
    updated_at timestamptz,
    __cdc_operation text,
    __cdc_timestamp timestamptz,
    __synced_at timestamptz
);
