-- Each task's size: the bytes of its parameters as canonical JSON. A lease
-- decides which tasks fit its byte limit from this column before it leases
-- any (src/domain/lease.rs), as on PostgreSQL. SQLite cannot drop a
-- column's default; every insert gives the size.
ALTER TABLE tasks ADD COLUMN parameters_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE tasks SET parameters_bytes = length(CAST(parameters AS BLOB));
