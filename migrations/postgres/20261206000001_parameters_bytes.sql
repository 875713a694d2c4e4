-- Each task's size: the bytes of its parameters as canonical JSON, as the
-- server received them. A lease decides which tasks fit its byte limit
-- from this column before it locks any row (src/domain/lease.rs), so that
-- it locks only the tasks it hands out, and never reads parameters to
-- choose. Tasks stored before this migration are measured by their jsonb
-- text, which may be a few bytes longer.
ALTER TABLE tasks ADD COLUMN parameters_bytes integer NOT NULL DEFAULT 0;
UPDATE tasks SET parameters_bytes = octet_length(parameters::text);
-- Every insert says it: one that forgot would fail rather than store 0.
ALTER TABLE tasks ALTER COLUMN parameters_bytes DROP DEFAULT;
