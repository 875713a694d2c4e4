-- The foreign key from idempotency_keys.task_id to tasks.task_id is
-- deferred, so inserting a task has SQLite look for key rows that name it:
-- without an index that is a scan of idempotency_keys for every created
-- task, and creates slowed down as the table grew.
CREATE INDEX idempotency_keys_task_id ON idempotency_keys (task_id);
