-- The type zoo: one source table holding every PostgreSQL type the fidelity issue names, plus
-- the shapes around it (keyless table, REPLICA IDENTITY FULL, truncate, logical message,
-- primary-key change). tools/capture-zoo runs this against a fresh database with Debezium
-- attached, then reads the topics back into fixtures. Values are fixed (no now()), so every
-- capture of the zoo describes the same source rows.
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');

CREATE TABLE type_zoo (
    id integer PRIMARY KEY,
    c_bool boolean,
    c_int2 smallint,
    c_int4 integer,
    c_int8 bigint,
    c_float4 real,
    c_float8 double precision,
    c_numeric numeric(12,4),
    c_numeric_free numeric,
    c_numeric_wide numeric(60,10),
    c_money money,
    c_text text,
    c_varchar varchar(40),
    c_char char(5),
    c_uuid uuid,
    c_json json,
    c_jsonb jsonb,
    c_enum mood,
    c_int_array integer[],
    c_text_array text[],
    c_interval interval,
    c_bytea bytea,
    c_inet inet,
    c_date date,
    c_time time,
    c_time_ms time(3),
    c_timetz timetz,
    c_timestamp timestamp,
    c_timestamp_ms timestamp(3),
    c_timestamptz timestamptz,
    c_big_text text
);
-- type_zoo keeps the default replica identity, so an update that leaves the out-of-line
-- c_big_text unchanged carries Debezium's TOAST placeholder instead of the text.
-- zoo_nokey has no primary key; REPLICA IDENTITY FULL makes its updates and deletes carry
-- every column's before-image.

CREATE TABLE zoo_nokey (sku text NOT NULL, qty integer);
ALTER TABLE zoo_nokey REPLICA IDENTITY FULL;


CREATE TABLE zoo_truncated (id integer PRIMARY KEY, note text);

CREATE TABLE zoo_json (id integer PRIMARY KEY, doc json);
