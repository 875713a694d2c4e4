-- The SQLite schema mirrors migrations/postgres. Times are microseconds since
-- the Unix epoch; ids are UUID strings; JSON is text in canonical form.

-- Tasks are never deleted by oncely; `seq` gives a stable creation order for
-- paging an agent's tasks.
CREATE TABLE tasks (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     TEXT    NOT NULL UNIQUE,
    agent_id    TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    parameters  TEXT    NOT NULL,
    status      INTEGER NOT NULL,
    result      TEXT,
    create_time INTEGER NOT NULL
) STRICT;

CREATE INDEX tasks_agent_id_seq ON tasks (agent_id, seq);

-- One row per claimed key. `response` is the encoded tasks.v1.Task returned
-- to the first request and replayed byte for byte to every retry. The key is
-- claimed before its task is inserted, in one transaction, so the foreign key
-- is checked at commit.
CREATE TABLE idempotency_keys (
    scope       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint BLOB    NOT NULL,
    task_id     TEXT    NOT NULL REFERENCES tasks (task_id) DEFERRABLE INITIALLY DEFERRED,
    response    BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
) STRICT;

-- Cleanup deletes each scope's records by age in batches (keyless records
-- have a shorter window than keyed ones).
CREATE INDEX idempotency_keys_scope_created_at ON idempotency_keys (scope, created_at);
