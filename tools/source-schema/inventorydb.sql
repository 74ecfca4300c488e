-- The seeds' bookstore schema, source side (inventorydb).
CREATE TABLE IF NOT EXISTS inventory (
    book_id uuid PRIMARY KEY,
    quantity int NOT NULL DEFAULT 0,
    reserved int NOT NULL DEFAULT 0,
    updated_at timestamptz DEFAULT now()
);
