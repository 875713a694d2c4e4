-- Idempotency records are scoped by agent from this version on; see the
-- PostgreSQL migration of the same name. `at` is in microseconds since the
-- Unix epoch, as every time here.
CREATE TABLE upgrade_marks (
    name TEXT    PRIMARY KEY,
    at   INTEGER NOT NULL
);

INSERT INTO upgrade_marks (name, at)
SELECT 'legacy_key_records', CAST(unixepoch('subsec') * 1000000 AS INTEGER)
WHERE EXISTS (SELECT 1 FROM idempotency_keys);
