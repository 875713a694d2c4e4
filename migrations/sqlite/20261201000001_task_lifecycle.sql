-- The task lifecycle, as in migrations/postgres: `available_at` is when a
-- task may next be leased (a queued task: now or the end of its backoff; a
-- running one: when its lease runs out). Times in microseconds.
ALTER TABLE tasks ADD COLUMN attempt       INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN update_time   INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN error_message TEXT    NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN available_at  INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN lease_token   TEXT;
ALTER TABLE tasks ADD COLUMN worker_id     TEXT;

UPDATE tasks SET update_time = create_time, available_at = create_time;

-- Queued (1) and running (2) tasks, by when they can next be leased.
CREATE INDEX tasks_leasable ON tasks (available_at, seq) WHERE status IN (1, 2);
