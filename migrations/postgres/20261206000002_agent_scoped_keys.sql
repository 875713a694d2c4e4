-- From this version on, idempotency records are scoped by the agent a
-- task is for ("@<agent_id> <key>"); until now they were scoped by the API
-- key that wrote them ("<key name> <key>", or the bare key without
-- authentication). Those records keep answering until they expire. This
-- table says when the last of them may have been written: set here when
-- records exist, and kept current by instances that still write them
-- (LEGACY_KEY_SCOPE=dual, during a rolling upgrade), so that instances
-- look for them only while one could be live.
CREATE TABLE upgrade_marks (
    name text        PRIMARY KEY,
    at   timestamptz NOT NULL
);

INSERT INTO upgrade_marks (name, at)
SELECT 'legacy_key_records', now() WHERE EXISTS (SELECT 1 FROM idempotency_keys);
