-- The zoo's changes, applied once Debezium streams (the snapshot already holds rows 1 and 2).
-- Each statement is its own transaction (psql autocommit) unless grouped.
INSERT INTO type_zoo VALUES (
    3, false, -32768, -2147483648, -9223372036854775808,
    'NaN', '-Infinity',
    -99999999.9999, 'NaN',
    -12345678901234567890123456789012345678901234567890.0123456789,
    -92233720368547758.08,
    '', '', '', '00000000-0000-0000-0000-000000000000',
    '{"escaped": "\u00e9\ud83c\udf89", "deep": {"a": [1, 2.50, null]}}', '{}', 'sad',
    '{}', '{"", "with \"quote\"", "NULL"}',
    '-1 years -2 mons +3 days -04:05:06.789', '\x', '::1/128',
    'infinity', '00:00:00', '23:59:59.999', '00:00:00-12', '-infinity', 'infinity', 'infinity',
    NULL);
INSERT INTO type_zoo (id) VALUES (4);
BEGIN;
UPDATE type_zoo SET c_int4 = c_int4 + 1, c_numeric_free = 'Infinity' WHERE id = 1;
UPDATE type_zoo SET c_text = 'ünïcödé 日本語 🎉 עברית e' || U&'\0301' || ' zero' || U&'\200B' || 'width' WHERE id = 2;
COMMIT;
-- A large out-of-line text stays unchanged while another column changes: Debezium sends the
-- TOAST placeholder for it.
UPDATE type_zoo SET c_bool = NOT c_bool WHERE id = 1;
UPDATE type_zoo SET c_numeric_free = '-Infinity', c_float4 = 'Infinity' WHERE id = 4;
-- A primary-key change: delete + tombstone for the old key, create for the new one.
UPDATE type_zoo SET id = 5 WHERE id = 4;
INSERT INTO type_zoo (id, c_text) VALUES (6, 'short-lived');
DELETE FROM type_zoo WHERE id = 6;

-- jsonb cannot store U+0000; a json column can. The mirror (jsonb) rejects that row with the
-- reason; the raw log's envelope and the lake keep the document.
INSERT INTO zoo_json VALUES (1, '{"nul": "\u0000"}'), (2, '{"ok": true}');

INSERT INTO zoo_nokey VALUES ('A-1', 1), ('B-2', 2);
UPDATE zoo_nokey SET qty = 10 WHERE sku = 'A-1';
DELETE FROM zoo_nokey WHERE sku = 'B-2';

INSERT INTO zoo_truncated VALUES (1, 'gone after the truncate'), (2, 'also gone');
TRUNCATE zoo_truncated;
INSERT INTO zoo_truncated VALUES (3, 'after the truncate');
SELECT pg_logical_emit_message(true, 'cdc-lake', 'a transactional logical message');
SELECT pg_logical_emit_message(false, 'cdc-lake', 'a non-transactional logical message');
-- The last change: capture-zoo waits for it.
INSERT INTO zoo_truncated VALUES (999, 'end of the zoo');
