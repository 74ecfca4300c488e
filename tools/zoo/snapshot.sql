-- Rows present before Debezium starts: they arrive as snapshot reads (op r).
INSERT INTO type_zoo VALUES (
    1, true, 12345, 1234567890, 1234567890123456789,
    3.25, 2.718281828459045,
    12345678.1234, 3.14159265358979323846264338327950288419716939937510,
    12345678901234567890123456789012345678901234567890.0123456789,
    1234.56,
    'hello', 'varchar value', 'ab', '5b2d2e6e-1a8f-4a5e-9c1e-6f7d0c4c7a11',
    '{"b": 2, "a": 1}', '{"b": 2, "a": [1, "x", {"c": null}]}', 'happy',
    '{1,2,3}', '{"a","b c"}',
    '1 year 2 mons 3 days 04:05:06.789', '\x00ff10', '192.168.10.1/24',
    '2024-03-02', '10:30:45.123456', '10:30:45.123', '10:30:45.123456+05:30',
    '2024-03-02 10:30:45.123456', '2024-03-02 10:30:45.123', '2024-03-02 10:30:45.123456+05:30',
    -- Incompressible enough to be stored out of line (TOAST).
    (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g));
INSERT INTO type_zoo VALUES (
    2, NULL, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    'tab	newline
end', 'x', 'x', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
    'null', 'null', 'ok', '{NULL,5}', '{NULL}',
    '0 seconds', '\x00', '10.0.0.1', '1970-01-01', '24:00:00', '00:00:00.001', '23:59:59+00',
    '1970-01-01 00:00:00', '1899-12-31 23:59:59.999', '1970-01-01 00:00:00+00',
    'short');
