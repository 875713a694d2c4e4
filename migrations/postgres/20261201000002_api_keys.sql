-- API keys: who may call, in which role, for which agents or actions. Only
-- the SHA-256 of a token is kept; the token is shown once, at creation.
-- Revoked keys stay (revoked_at set) so that the server keeps requiring
-- keys once any was created, and so `keys list` shows the history.
CREATE TABLE api_keys (
    name        text        PRIMARY KEY,
    token_hash  bytea       NOT NULL UNIQUE,
    role        text        NOT NULL CHECK (role IN ('agent', 'worker', 'admin')),
    -- JSON arrays of strings: the agent ids an agent key may act for, the
    -- actions a worker key may perform (empty: any).
    agent_ids   jsonb       NOT NULL,
    actions     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
