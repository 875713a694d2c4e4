-- The status page lists the latest failed tasks.
CREATE INDEX tasks_failed ON tasks (update_time) WHERE status = 4;
