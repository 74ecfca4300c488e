-- The seeds' bookstore analytics layer: the fact and dimension tables cdc-lake's mappings fill
-- ([targets.analytics] in deploy/config/demo.toml) and the ten views a BI tool reads
-- (docs/analytics.md). cdc-lake runs this file whenever it opens the target, so every
-- statement is idempotent. No foreign keys: a fact may arrive before its dimension row.
-- Revenue never counts cancelled orders.
CREATE SCHEMA IF NOT EXISTS analytics;

CREATE TABLE IF NOT EXISTS analytics.dim_books (
    book_id        uuid PRIMARY KEY,
    title          text,
    author         text,
    genre          text,
    price          numeric(10,2),
    published_year integer,
    created_at     timestamptz,
    source_system  text,
    source_lsn     bigint
);

CREATE TABLE IF NOT EXISTS analytics.fact_orders (
    order_id   uuid PRIMARY KEY,
    user_id    text,
    total      numeric(10,2),
    status     text,
    created_at timestamptz,
    source_ts  timestamptz,
    synced_at  timestamptz
);

CREATE TABLE IF NOT EXISTS analytics.fact_order_items (
    item_id           uuid PRIMARY KEY,
    order_id          uuid,
    book_id           uuid,
    quantity          integer,
    price_at_purchase numeric(10,2)
);

CREATE TABLE IF NOT EXISTS analytics.fact_inventory (
    book_id    uuid PRIMARY KEY,
    quantity   integer,
    reserved   integer,
    updated_at timestamptz
);

-- Every insert, update and snapshot read of an order, one row each (its mapping ignores
-- deletes): the status history.
CREATE TABLE IF NOT EXISTS analytics.fact_order_events (
    order_id        uuid,
    source_lsn      bigint,
    operation       text,
    status          text,
    total           numeric(10,2),
    source_ts       timestamptz,
    kafka_partition integer,
    kafka_offset    bigint,
    PRIMARY KEY (order_id, source_lsn)
);

-- Line items of orders that count as sales (not cancelled).
CREATE OR REPLACE VIEW analytics.vw_product_sales_volume AS
SELECT i.book_id,
       b.title,
       sum(i.quantity)::bigint     AS units_sold,
       count(DISTINCT i.order_id)  AS orders
  FROM analytics.fact_order_items i
  JOIN analytics.fact_orders o ON o.order_id = i.order_id AND o.status <> 'CANCELLED'
  LEFT JOIN analytics.dim_books b ON b.book_id = i.book_id
 GROUP BY i.book_id, b.title;

CREATE OR REPLACE VIEW analytics.vw_sales_over_time AS
SELECT (o.created_at AT TIME ZONE 'UTC')::date AS day,
       count(*)      AS orders,
       sum(o.total)  AS revenue
  FROM analytics.fact_orders o
 WHERE o.status <> 'CANCELLED'
 GROUP BY 1;

CREATE OR REPLACE VIEW analytics.vw_revenue_by_author AS
SELECT coalesce(b.author, '(unknown)')          AS author,
       sum(i.quantity * i.price_at_purchase)    AS revenue,
       sum(i.quantity)::bigint                  AS units_sold
  FROM analytics.fact_order_items i
  JOIN analytics.fact_orders o ON o.order_id = i.order_id AND o.status <> 'CANCELLED'
  LEFT JOIN analytics.dim_books b ON b.book_id = i.book_id
 GROUP BY 1;

CREATE OR REPLACE VIEW analytics.vw_revenue_by_genre AS
SELECT coalesce(b.genre, '(unknown)')           AS genre,
       sum(i.quantity * i.price_at_purchase)    AS revenue,
       sum(i.quantity)::bigint                  AS units_sold
  FROM analytics.fact_order_items i
  JOIN analytics.fact_orders o ON o.order_id = i.order_id AND o.status <> 'CANCELLED'
  LEFT JOIN analytics.dim_books b ON b.book_id = i.book_id
 GROUP BY 1;

CREATE OR REPLACE VIEW analytics.vw_order_status_distribution AS
SELECT status,
       count(*)                                              AS orders,
       round(100.0 * count(*) / sum(count(*)) OVER (), 2)    AS percent
  FROM analytics.fact_orders
 GROUP BY status;

CREATE OR REPLACE VIEW analytics.vw_inventory_health AS
SELECT v.book_id,
       b.title,
       v.quantity,
       v.reserved,
       v.quantity - v.reserved AS available,
       CASE WHEN v.quantity - v.reserved <= 0 THEN 'OUT_OF_STOCK'
            WHEN v.quantity - v.reserved < 10 THEN 'LOW'
            ELSE 'OK' END      AS health
  FROM analytics.fact_inventory v
  LEFT JOIN analytics.dim_books b ON b.book_id = v.book_id;

CREATE OR REPLACE VIEW analytics.vw_avg_order_value AS
SELECT count(*)                 AS orders,
       coalesce(sum(total), 0)  AS revenue,
       round(avg(total), 2)     AS avg_order_value
  FROM analytics.fact_orders
 WHERE status <> 'CANCELLED';

CREATE OR REPLACE VIEW analytics.vw_top_books_by_revenue AS
SELECT rank, book_id, title, revenue
  FROM (SELECT row_number() OVER (ORDER BY sum(i.quantity * i.price_at_purchase) DESC, i.book_id) AS rank,
               i.book_id,
               b.title,
               sum(i.quantity * i.price_at_purchase) AS revenue
          FROM analytics.fact_order_items i
          JOIN analytics.fact_orders o ON o.order_id = i.order_id AND o.status <> 'CANCELLED'
          LEFT JOIN analytics.dim_books b ON b.book_id = i.book_id
         GROUP BY i.book_id, b.title) ranked
 WHERE rank <= 10;

-- Units sold per unit on hand: how fast each title's stock turns over.
CREATE OR REPLACE VIEW analytics.vw_inventory_turnover AS
SELECT v.book_id,
       b.title,
       coalesce(s.units_sold, 0)                                  AS units_sold,
       v.quantity                                                 AS on_hand,
       round(coalesce(s.units_sold, 0)::numeric / nullif(v.quantity, 0), 2) AS turnover
  FROM analytics.fact_inventory v
  LEFT JOIN analytics.dim_books b ON b.book_id = v.book_id
  LEFT JOIN (SELECT i.book_id, sum(i.quantity) AS units_sold
               FROM analytics.fact_order_items i
               JOIN analytics.fact_orders o ON o.order_id = i.order_id AND o.status <> 'CANCELLED'
              GROUP BY i.book_id) s ON s.book_id = v.book_id;

CREATE OR REPLACE VIEW analytics.vw_book_price_distribution AS
SELECT CASE WHEN price < 10 THEN '< 10'
            WHEN price < 20 THEN '10-20'
            WHEN price < 30 THEN '20-30'
            WHEN price < 50 THEN '30-50'
            ELSE '50+' END  AS price_band,
       count(*)              AS books,
       round(avg(price), 2)  AS avg_price
  FROM analytics.dim_books
 WHERE price IS NOT NULL
 GROUP BY 1;
