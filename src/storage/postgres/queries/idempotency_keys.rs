//! The statements of idempotency records on PostgreSQL: looking a key up,
//! claiming keys with their tasks (and the earlier scope's twins), and
//! cleaning up old records.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Row, postgres::PgRow};

use crate::storage::{Claimed, KeyClaim, KeyLookup, StorageError, StoredKey, micros};

/// Looks up a live key record with one indexed read, and reads the database
/// clock in the same statement.
///
/// Liveness is tested as `now() - created_at < retention`, a form no index
/// can serve, so that the only index the lookup can use is the primary key:
/// as `created_at > now() - retention` it matches the cleanup index on
/// `(scope, created_at)` as well, and a plan cached while the table was
/// small walks every live key of the scope.
pub async fn find_key(
    db: impl PgExecutor<'_>,
    scope: &str,
    key: &str,
    retention: Duration,
) -> Result<KeyLookup, StorageError> {
    let row = sqlx::query(
        "SELECT now() AS now, k.fingerprint, k.response, \
                (extract(epoch FROM k.created_at - now()) * 1000000)::bigint + $4 AS remaining_us \
         FROM (SELECT 1) AS one \
         LEFT JOIN idempotency_keys AS k \
           ON k.scope = $1 AND k.key = $2 AND now() - k.created_at < $3::interval",
    )
    .bind(scope)
    .bind(key)
    .bind(retention)
    .bind(micros(retention))
    .fetch_one(db)
    .await?;
    Ok(KeyLookup {
        record: stored_key(&row)?,
        now: row.try_get("now")?,
    })
}

/// The earliest live record among `keys` of `scope` whose task is for
/// `agent_id` (see [`crate::storage::Store::find_legacy_key`]). Each key
/// and its task are read by a lateral `LIMIT 1` probe of their primary
/// keys, which the planner cannot turn into a join.
pub async fn find_legacy_key(
    db: impl PgExecutor<'_>,
    scope: &str,
    keys: &[String],
    agent_id: &str,
    retention: Duration,
) -> Result<Option<StoredKey>, StorageError> {
    let row = sqlx::query(
        "SELECT k.fingerprint, k.response, \
                (extract(epoch FROM k.created_at - now()) * 1000000)::bigint + $5 AS remaining_us \
         FROM unnest($2::text[]) AS wanted(key) \
         CROSS JOIN LATERAL ( \
             SELECT fingerprint, response, created_at, task_id FROM idempotency_keys \
             WHERE scope = $1 AND key = wanted.key AND now() - created_at < $4::interval \
             LIMIT 1 \
         ) AS k \
         CROSS JOIN LATERAL ( \
             SELECT agent_id FROM tasks WHERE task_id = k.task_id LIMIT 1 \
         ) AS t \
         WHERE t.agent_id = $3 \
         ORDER BY k.created_at \
         LIMIT 1",
    )
    .bind(scope)
    .bind(keys)
    .bind(agent_id)
    .bind(retention)
    .bind(micros(retention))
    .fetch_optional(db)
    .await?;
    Ok(row.as_ref().map(stored_key).transpose()?.flatten())
}

/// Claims each key and inserts its task, in one statement, which
/// PostgreSQL runs as one transaction: for each claim, its key and its
/// task commit together or not at all, and no explicit BEGIN is needed (so
/// a cancelled request cannot leave a pooled connection inside a
/// transaction). Answers in the claims' order, in one round trip: a claim
/// whose key a live record holds reads that record in the same statement.
///
/// Notifies no one: the caller does, after the commit (see `notify.rs`).
///
/// The read of a held record is a lateral subquery with `LIMIT 1`, which
/// the planner cannot turn into a join, and it tests liveness in a form no
/// index serves (as `find_key` does): it is one primary-key probe per
/// unclaimed key, whatever the table's statistics said when the plan was
/// cached. (As a plain join, a generic plan made while the table was
/// small hashed a sequential scan of every key record, each batch, long
/// after the table had grown.)
///
/// The tasks are numbered (`seq`) under a shared advisory lock, taken once
/// every key of the batch is claimed (the sort is the barrier: no lock is
/// held while a key waits); ListTasks takes it exclusively before it reads
/// (see [`list_settled_tasks`](super::list_settled_tasks)), so a page never holds a task while an
/// earlier-numbered one is still uncommitted.
///
/// The claims share one `retention` (the batcher sends keyed and keyless
/// claims in statements of their own), so that it is one parameter rather
/// than looked up per conflicting row.
///
/// The read of a live record uses the statement's snapshot, so a record
/// that replaced an expired one while this statement waited for its lock
/// is not seen: the claim answers [`Claimed::Unseen`] (never the expired
/// record it replaced), and the caller reads again.
///
/// The keys must be distinct. A record older than the retention is
/// replaced; a live one is left untouched (and locked until the statement
/// ends). A concurrent uncommitted claim of the same key makes this
/// statement wait for its outcome, at most `lock_timeout`. Keys are
/// inserted in (scope, key) order, so two batches never deadlock.
pub async fn claim_keys(
    db: impl PgExecutor<'_>,
    claims: &[KeyClaim],
    retention: Duration,
) -> Result<Vec<Claimed>, StorageError> {
    let rows = sqlx::query(concat!(
        "WITH input AS ( \
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::uuid[], $5::text[], \
                                  $6::text[], $7::text[], $8::bytea[], $9::timestamptz[]) \
                 WITH ORDINALITY AS i(scope, key, fingerprint, task_id, agent_id, action, \
                                      parameters, response, create_time, ord) \
         ), claim AS ( \
             INSERT INTO idempotency_keys AS k (scope, key, fingerprint, task_id, response) \
             SELECT scope, key, fingerprint, task_id, response FROM input ORDER BY scope, key \
             ON CONFLICT (scope, key) DO UPDATE \
                 SET fingerprint = EXCLUDED.fingerprint, task_id = EXCLUDED.task_id, \
                     response = EXCLUDED.response, created_at = now() \
                 WHERE k.created_at <= now() - interval '1 microsecond' * $10 \
             RETURNING task_id \
         ), created AS ( \
             INSERT INTO tasks (task_id, agent_id, action, parameters, parameters_bytes, \
                                status, create_time, update_time, available_at) \
             SELECT task_id, agent_id, action, parameters::jsonb, octet_length(parameters), ",
        status!(queued),
        ", \
                    create_time, create_time, now() \
             FROM ( \
                 SELECT claimed.*, pg_advisory_xact_lock_shared(",
        seq_lock!(),
        ") AS numbering \
                 FROM ( \
                     SELECT i.task_id, i.agent_id, i.action, i.parameters, i.create_time, i.ord \
                     FROM input AS i JOIN claim AS c ON c.task_id = i.task_id \
                     ORDER BY i.ord OFFSET 0 \
                 ) AS claimed \
             ) AS numbered \
             RETURNING task_id \
         ) \
         SELECT i.ord, c.task_id IS NOT NULL AS claimed, k.fingerprint, k.response, \
                (extract(epoch FROM k.created_at - now()) * 1000000)::bigint + $10 \
                    AS remaining_us, \
                (SELECT count(*) FROM created) AS created \
         FROM input AS i \
         LEFT JOIN claim AS c ON c.task_id = i.task_id \
         LEFT JOIN LATERAL ( \
             SELECT k.fingerprint, k.response, k.created_at FROM idempotency_keys AS k \
             WHERE c.task_id IS NULL AND k.scope = i.scope AND k.key = i.key \
               AND now() - k.created_at < interval '1 microsecond' * $10 \
             LIMIT 1 \
         ) AS k ON true \
         ORDER BY i.ord"
    ))
    .bind(claims.iter().map(|c| c.scope).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.key.as_str()).collect::<Vec<_>>())
    .bind(
        claims
            .iter()
            .map(|c| c.fingerprint.as_slice())
            .collect::<Vec<_>>(),
    )
    .bind(claims.iter().map(|c| c.task_id).collect::<Vec<_>>())
    .bind(
        claims
            .iter()
            .map(|c| c.agent_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(claims.iter().map(|c| c.action.as_str()).collect::<Vec<_>>())
    .bind(
        claims
            .iter()
            .map(|c| c.parameters_json.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        claims
            .iter()
            .map(|c| c.response.as_slice())
            .collect::<Vec<_>>(),
    )
    .bind(claims.iter().map(|c| c.create_time).collect::<Vec<_>>())
    .bind(micros(retention))
    .fetch_all(db)
    .await?;
    if rows.len() != claims.len() {
        return Err(StorageError::Corrupt(format!(
            "a claim of {} keys answered {} rows",
            claims.len(),
            rows.len()
        )));
    }
    rows.iter()
        .map(|row| {
            if row.try_get::<bool, _>("claimed")? {
                return Ok(Claimed::Created);
            }
            Ok(match stored_key(row)? {
                Some(stored) => Claimed::Held(stored),
                None => Claimed::Unseen,
            })
        })
        .collect()
}

/// When a record of the earlier, per-API-key scope was last written, at
/// the latest.
pub async fn legacy_key_records_at(
    db: impl PgExecutor<'_>,
) -> Result<Option<DateTime<Utc>>, StorageError> {
    Ok(
        sqlx::query_scalar("SELECT at FROM upgrade_marks WHERE name = 'legacy_key_records'")
            .fetch_optional(db)
            .await?,
    )
}

/// Notes that records of the earlier scope are written now.
pub async fn mark_legacy_key_records(db: impl PgExecutor<'_>) -> Result<(), StorageError> {
    sqlx::query(
        "INSERT INTO upgrade_marks AS m (name, at) VALUES ('legacy_key_records', now()) \
         ON CONFLICT (name) DO UPDATE SET at = greatest(m.at, EXCLUDED.at)",
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The live record a row shows, if any: `fingerprint`, `response` and
/// `remaining_us`.
pub(super) fn stored_key(row: &PgRow) -> Result<Option<StoredKey>, StorageError> {
    Ok(StoredKey::from_columns(
        row.try_get("fingerprint")?,
        row.try_get("response")?,
        row.try_get("remaining_us")?,
    ))
}

/// The database clock minus `duration`.
pub async fn now_minus(
    db: impl PgExecutor<'_>,
    duration: Duration,
) -> Result<DateTime<Utc>, StorageError> {
    Ok(sqlx::query_scalar("SELECT now() - $1::interval")
        .bind(duration)
        .fetch_one(db)
        .await?)
}

/// Deletes at most `limit` records of `scope` created before `cutoff`,
/// oldest first. Rows locked by in-flight requests are skipped.
pub async fn delete_keys_created_before(
    db: impl PgExecutor<'_>,
    scope: &str,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys AS k USING ( \
             SELECT scope, key FROM idempotency_keys \
             WHERE scope = $3 AND created_at < $1 \
             ORDER BY created_at \
             LIMIT $2 \
             FOR UPDATE SKIP LOCKED \
         ) AS doomed \
         WHERE k.scope = doomed.scope AND k.key = doomed.key",
    )
    .bind(cutoff)
    .bind(limit)
    .bind(scope)
    .execute(db)
    .await?
    .rows_affected())
}
