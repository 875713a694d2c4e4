-- `oncely keys rotate`: a key gets a new token, and its previous token
-- keeps working until previous_until (the grace period), so that callers
-- can move to the new one without a refused call. Only hashes are kept.
ALTER TABLE api_keys
    ADD COLUMN previous_token_hash bytea UNIQUE,
    ADD COLUMN previous_until      timestamptz;
