-- Cleanup deletes keyless (fingerprint-scoped) records by their own, shorter
-- window; this index finds them without scanning every younger keyed record.
CREATE INDEX idempotency_keys_scope_created_at ON idempotency_keys (scope, created_at);
