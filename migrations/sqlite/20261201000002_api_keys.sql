-- API keys, as in migrations/postgres: only the SHA-256 of a token is kept.
CREATE TABLE api_keys (
    name        TEXT    PRIMARY KEY,
    token_hash  BLOB    NOT NULL UNIQUE,
    role        TEXT    NOT NULL CHECK (role IN ('agent', 'worker', 'admin')),
    agent_ids   TEXT    NOT NULL,
    actions     TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;
