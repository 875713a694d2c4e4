-- `oncely keys rotate`, as in migrations/postgres: the previous token's
-- hash and when it stops working (microseconds since the Unix epoch).
ALTER TABLE api_keys ADD COLUMN previous_token_hash BLOB;
ALTER TABLE api_keys ADD COLUMN previous_until INTEGER;
CREATE UNIQUE INDEX api_keys_previous_token_hash ON api_keys (previous_token_hash);
