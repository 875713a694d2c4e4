-- The status page lists the latest failed tasks. A plain CREATE INDEX:
-- it blocks writes to tasks while it reads the table once (seconds for
-- millions of tasks). CONCURRENTLY would not, but it waits for every
-- older transaction, and a second instance waiting for the migration lock
-- is one: concurrent starts could deadlock.
CREATE INDEX tasks_failed ON tasks (update_time) WHERE status = 4;
