-- The task lifecycle: workers lease tasks, renew, complete and fail them.
--
-- `available_at` is when a task may next be leased: for a queued task, now
-- or the end of its retry backoff; for a running one, when its lease runs
-- out. So an expired lease is simply leasable again (expiry is data, not a
-- daemon), and one index serves the claim.
ALTER TABLE tasks
    ADD COLUMN attempt       integer     NOT NULL DEFAULT 0,
    ADD COLUMN update_time   timestamptz,
    ADD COLUMN error_message text        NOT NULL DEFAULT '',
    ADD COLUMN available_at  timestamptz,
    ADD COLUMN lease_token   uuid,
    ADD COLUMN worker_id     text;

UPDATE tasks SET update_time = create_time, available_at = create_time;

ALTER TABLE tasks
    ALTER COLUMN update_time SET NOT NULL,
    ALTER COLUMN available_at SET NOT NULL;

-- Queued (1) and running (2) tasks, by when they can next be leased.
CREATE INDEX tasks_leasable ON tasks (available_at, seq) WHERE status IN (1, 2);
