-- Tasks are never deleted by oncely; `seq` gives a stable creation order for
-- paging an agent's tasks.
CREATE TABLE tasks (
    task_id     uuid        PRIMARY KEY,
    seq         bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    agent_id    text        NOT NULL,
    action      text        NOT NULL,
    parameters  jsonb       NOT NULL,
    status      smallint    NOT NULL,
    result      jsonb,
    create_time timestamptz NOT NULL
);

CREATE INDEX tasks_agent_id_seq ON tasks (agent_id, seq);

-- One row per claimed key. `response` is the encoded tasks.v1.Task returned
-- to the first request and replayed byte for byte to every retry.
CREATE TABLE idempotency_keys (
    scope       text        NOT NULL,
    key         text        NOT NULL,
    fingerprint bytea       NOT NULL,
    task_id     uuid        NOT NULL REFERENCES tasks (task_id),
    response    bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

-- Cleanup deletes each scope's records by age in batches (keyless records
-- have a shorter window than keyed ones).
CREATE INDEX idempotency_keys_scope_created_at ON idempotency_keys (scope, created_at);
