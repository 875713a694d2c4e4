//! Every statement the PostgreSQL store runs. Each takes any executor (a
//! pool, a connection, or a caller's open transaction) and is one round
//! trip.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Row, postgres::PgRow, types::Json};
use uuid::Uuid;

use super::super::{
    ClaimOutcome, KeyLookup, LeaseOrder, NewKeyedTask, RetryRule, StorageError, StoredKey,
    TaskPage, expired_message_template, object, role, token_hash,
};
use crate::domain::{ApiKeyRecord, Completion, Failure, LeaseRef, Principal, TaskRecord};

/// The channel every instance listens on. Payloads: `ready` (a task may be
/// leasable) and `finished:<task_id>`.
pub const CHANNEL: &str = "oncely_tasks";

/// Looks up a live key record with one indexed read, and reads the database
/// clock in the same statement.
pub async fn find_key(
    db: impl PgExecutor<'_>,
    scope: &str,
    key: &str,
    retention: Duration,
) -> Result<KeyLookup, StorageError> {
    let row = sqlx::query(
        "SELECT now() AS now, k.fingerprint, k.response \
         FROM (SELECT 1) AS one \
         LEFT JOIN idempotency_keys AS k \
           ON k.scope = $1 AND k.key = $2 AND k.created_at > now() - $3::interval",
    )
    .bind(scope)
    .bind(key)
    .bind(retention)
    .fetch_one(db)
    .await?;
    let fingerprint: Option<Vec<u8>> = row.try_get("fingerprint")?;
    let response: Option<Vec<u8>> = row.try_get("response")?;
    Ok(KeyLookup {
        record: fingerprint
            .zip(response)
            .map(|(fingerprint, response)| StoredKey {
                fingerprint,
                response,
            }),
        now: row.try_get("now")?,
    })
}

/// Claims the key and inserts its task in one statement, which PostgreSQL
/// runs as one transaction: both rows commit or neither does, and no
/// explicit BEGIN is needed (so a cancelled request cannot leave a pooled
/// connection inside a transaction).
///
/// A record older than the retention is replaced. A live record is left
/// untouched. A concurrent uncommitted claim of the same key makes this
/// statement wait for its outcome, at most `lock_timeout`.
pub async fn claim_key_and_insert_task(
    db: impl PgExecutor<'_>,
    new: &NewKeyedTask<'_>,
) -> Result<ClaimOutcome, StorageError> {
    let inserted = sqlx::query(
        "WITH claim AS ( \
             INSERT INTO idempotency_keys AS k (scope, key, fingerprint, task_id, response) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (scope, key) DO UPDATE \
                 SET fingerprint = EXCLUDED.fingerprint, task_id = EXCLUDED.task_id, \
                     response = EXCLUDED.response, created_at = now() \
                 WHERE k.created_at <= now() - $11::interval \
             RETURNING task_id \
         ) \
         INSERT INTO tasks \
             (task_id, agent_id, action, parameters, status, create_time, update_time, available_at) \
         SELECT task_id, $6, $7, $8::jsonb, $9, $10, $10, $10 FROM claim \
         RETURNING task_id, pg_notify('oncely_tasks', 'ready')::text",
    )
    .bind(new.scope)
    .bind(new.key)
    .bind(new.fingerprint.as_slice())
    .bind(new.task_id)
    .bind(new.response)
    .bind(&new.task.agent_id)
    .bind(&new.task.action)
    .bind(&new.task.parameters_json)
    .bind(new.status as i16)
    .bind(new.create_time)
    .bind(new.retention)
    .fetch_optional(db)
    .await?;
    Ok(match inserted {
        Some(_) => ClaimOutcome::Claimed,
        None => ClaimOutcome::AlreadyClaimed,
    })
}

/// The columns of a [`TaskRecord`], as [`task_record`] reads them.
macro_rules! task_columns {
    () => {
        "seq, task_id, agent_id, action, parameters, status, result, create_time, \
         attempt, update_time, error_message, lease_token, available_at"
    };
}

/// A task's columns after an update that ended it, with the notification
/// that wakes its waiters on every instance.
macro_rules! returning_finished {
    () => {
        concat!(
            " RETURNING ",
            task_columns!(),
            ", pg_notify('oncely_tasks', 'finished:' || task_id)::text"
        )
    };
}

/// Reads one task.
pub async fn get_task(
    db: impl PgExecutor<'_>,
    task_id: Uuid,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE task_id = $1"
    ))
    .bind(task_id)
    .fetch_optional(db)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Reads up to `limit` of an agent's tasks created after `after_seq`,
/// oldest first.
/// The running size of a page is summed over the rows in order; a row is
/// kept while the rows before it hold less than `$4` bytes.
pub async fn list_tasks(
    db: impl PgExecutor<'_>,
    agent_id: &str,
    after_seq: i64,
    limit: i64,
    max_bytes: i64,
) -> Result<TaskPage, StorageError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        ", running, size FROM ( \
             SELECT ",
        task_columns!(),
        ", sum(octet_length(parameters::text) + coalesce(octet_length(result::text), 0)) \
                   OVER (ORDER BY seq) AS running, \
                octet_length(parameters::text) + coalesce(octet_length(result::text), 0) AS size \
             FROM tasks WHERE agent_id = $1 AND seq > $2 ORDER BY seq LIMIT $3 \
         ) AS page WHERE running - size < $4 ORDER BY seq"
    ))
    .bind(agent_id)
    .bind(after_seq)
    .bind(limit)
    .bind(max_bytes)
    .fetch_all(db)
    .await?;
    let cut_by_size = match rows.last() {
        Some(row) => row.try_get::<i64, _>("running")? >= max_bytes,
        None => false,
    };
    Ok(TaskPage {
        tasks: rows.iter().map(task_record).collect::<Result<_, _>>()?,
        cut_by_size,
    })
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

/// Checks that the database answers.
pub async fn ping(db: impl PgExecutor<'_>) -> Result<(), StorageError> {
    sqlx::query("SELECT 1").execute(db).await?;
    Ok(())
}

/// What one lease statement did.
#[derive(Debug, Default)]
pub struct Leased {
    /// The leased tasks, RUNNING, oldest first.
    pub leased: Vec<TaskRecord>,
    /// How many picked tasks it ended FAILED instead (their last allowed
    /// lease had run out); they took places of the limit.
    pub failed: usize,
}

/// Leases up to `order.max_tasks` available tasks in one statement: a CTE
/// picks the oldest `FOR UPDATE SKIP LOCKED` (so the limit holds and no
/// caller waits on another's rows), and the update leases exactly those.
/// A running task whose lease ran out on its last allowed attempt is ended
/// FAILED instead, and its waiters notified. Status numbers: 1 queued,
/// 2 running, 4 failed.
pub async fn lease_tasks(
    db: impl PgExecutor<'_>,
    order: &LeaseOrder<'_>,
) -> Result<Leased, StorageError> {
    let rows = sqlx::query(concat!(
        "WITH picked AS ( \
             SELECT task_id FROM tasks \
             WHERE status IN (1, 2) AND available_at <= now() \
               AND (cardinality($2::text[]) = 0 OR action = ANY($2::text[])) \
             ORDER BY available_at, seq \
             LIMIT $3 \
             FOR UPDATE SKIP LOCKED \
         ), changed AS ( \
             UPDATE tasks AS t SET \
                 status = CASE WHEN t.status = 2 AND t.attempt >= $5 THEN 4 ELSE 2 END, \
                 error_message = CASE WHEN t.status = 2 THEN format($6, t.attempt) \
                                      ELSE t.error_message END, \
                 attempt = CASE WHEN t.status = 2 AND t.attempt >= $5 THEN t.attempt \
                                ELSE t.attempt + 1 END, \
                 lease_token = CASE WHEN t.status = 2 AND t.attempt >= $5 THEN t.lease_token \
                                    ELSE gen_random_uuid() END, \
                 worker_id = CASE WHEN t.status = 2 AND t.attempt >= $5 THEN t.worker_id \
                                  ELSE $1 END, \
                 available_at = CASE WHEN t.status = 2 AND t.attempt >= $5 THEN t.available_at \
                                     ELSE now() + $4::interval END, \
                 update_time = now() \
             FROM picked WHERE t.task_id = picked.task_id \
             RETURNING t.* \
         ) \
         SELECT ",
        task_columns!(),
        ", CASE WHEN status = 4 \
                THEN pg_notify('oncely_tasks', 'finished:' || task_id)::text END \
         FROM changed ORDER BY available_at, seq"
    ))
    .bind(order.worker_id)
    .bind(order.actions)
    .bind(order.max_tasks)
    .bind(order.lease_duration)
    .bind(order.max_attempts)
    .bind(expired_message_template(order.max_attempts))
    .fetch_all(db)
    .await?;
    let mut done = Leased::default();
    for row in &rows {
        let task = task_record(row)?;
        if task.status == 2 {
            done.leased.push(task);
        } else {
            done.failed += 1;
        }
    }
    Ok(done)
}

/// Extends a lease that is still the task's current one.
pub async fn renew_lease(
    db: impl PgExecutor<'_>,
    lease: LeaseRef,
    lease_duration: Duration,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET available_at = now() + $3::interval, update_time = now() \
         WHERE task_id = $1 AND lease_token = $2 AND status = 2 \
         RETURNING ",
        task_columns!()
    ))
    .bind(lease.task_id.0)
    .bind(lease.token)
    .bind(lease_duration)
    .fetch_optional(db)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Marks the task SUCCEEDED (3) with its result, if the lease is current.
pub async fn complete_task(
    db: impl PgExecutor<'_>,
    completion: &Completion,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET status = 3, result = $3::jsonb, error_message = '', update_time = now() \
         WHERE task_id = $1 AND lease_token = $2 AND status = 2",
        returning_finished!()
    ))
    .bind(completion.lease.task_id.0)
    .bind(completion.lease.token)
    .bind(&completion.result_json)
    .fetch_optional(db)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Records a failed attempt, if the lease is current: FAILED (4) when
/// permanent or on the last allowed attempt, else queued (1) again after
/// `retry_after` or a random delay up to the attempt's backoff ceiling.
pub async fn fail_task(
    db: impl PgExecutor<'_>,
    failure: &Failure,
    retry: &RetryRule,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks AS t SET \
             status = CASE WHEN $4 OR t.attempt >= $5 THEN 4 ELSE 1 END, \
             error_message = $3, \
             available_at = CASE WHEN $4 OR t.attempt >= $5 THEN t.available_at \
                 ELSE now() + make_interval(secs => COALESCE($6::float8, \
                     least($8::float8, $7::float8 * (1::bigint << least(t.attempt - 1, 30))) \
                     * random())) END, \
             update_time = now() \
         WHERE task_id = $1 AND lease_token = $2 AND status = 2 \
         RETURNING ",
        task_columns!(),
        ", CASE WHEN status = 4 THEN pg_notify('oncely_tasks', 'finished:' || task_id) \
                ELSE pg_notify('oncely_tasks', 'ready') END::text"
    ))
    .bind(failure.lease.task_id.0)
    .bind(failure.lease.token)
    .bind(&failure.message)
    .bind(failure.permanent)
    .bind(retry.max_attempts)
    .bind(failure.retry_after.map(|d| d.as_secs_f64()))
    .bind(retry.backoff_base.as_secs_f64())
    .bind(retry.backoff_max.as_secs_f64())
    .fetch_optional(db)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Cancels (5) a queued or running task.
pub async fn cancel_task(
    db: impl PgExecutor<'_>,
    task_id: Uuid,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET status = 5, update_time = now() \
         WHERE task_id = $1 AND status IN (1, 2)",
        returning_finished!()
    ))
    .bind(task_id)
    .fetch_optional(db)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Every API key, revoked ones included, oldest first.
pub async fn api_keys(db: impl PgExecutor<'_>) -> Result<Vec<ApiKeyRecord>, StorageError> {
    let rows = sqlx::query(
        "SELECT name, token_hash, role, agent_ids, actions, created_at, revoked_at \
         FROM api_keys ORDER BY created_at, name",
    )
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|row| {
            let Json(agent_ids) = row.try_get::<Json<Vec<String>>, _>("agent_ids")?;
            let Json(actions) = row.try_get::<Json<Vec<String>>, _>("actions")?;
            Ok(ApiKeyRecord {
                principal: Principal {
                    name: row.try_get("name")?,
                    role: role(row.try_get("role")?)?,
                    agent_ids,
                    actions,
                },
                token_hash: token_hash(row.try_get("token_hash")?)?,
                created_at: row.try_get("created_at")?,
                revoked_at: row.try_get("revoked_at")?,
            })
        })
        .collect()
}

/// Stores a new API key; `false` when the name is taken.
pub async fn insert_api_key(
    db: impl PgExecutor<'_>,
    key: &ApiKeyRecord,
) -> Result<bool, StorageError> {
    let inserted = sqlx::query(
        "INSERT INTO api_keys (name, token_hash, role, agent_ids, actions) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING RETURNING name",
    )
    .bind(&key.principal.name)
    .bind(key.token_hash.as_slice())
    .bind(key.principal.role.as_str())
    .bind(Json(&key.principal.agent_ids))
    .bind(Json(&key.principal.actions))
    .fetch_optional(db)
    .await?;
    Ok(inserted.is_some())
}

/// Revokes a live key; `false` when there is none of that name.
pub async fn revoke_api_key(db: impl PgExecutor<'_>, name: &str) -> Result<bool, StorageError> {
    Ok(
        sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
        )
        .bind(name)
        .execute(db)
        .await?
        .rows_affected()
            == 1,
    )
}

fn task_record(row: &PgRow) -> Result<TaskRecord, StorageError> {
    let task_id: Uuid = row.try_get("task_id")?;
    let Json(parameters) = row.try_get::<Json<serde_json::Value>, _>("parameters")?;
    let result = row
        .try_get::<Option<Json<serde_json::Value>>, _>("result")?
        .map(|Json(v)| object(task_id, "result", v))
        .transpose()?;
    Ok(TaskRecord {
        seq: row.try_get("seq")?,
        task_id,
        agent_id: row.try_get("agent_id")?,
        action: row.try_get("action")?,
        parameters: object(task_id, "parameters", parameters)?,
        status: i32::from(row.try_get::<i16, _>("status")?),
        result,
        create_time: row.try_get("create_time")?,
        attempt: row.try_get("attempt")?,
        update_time: row.try_get("update_time")?,
        error_message: row.try_get("error_message")?,
        lease_token: row.try_get("lease_token")?,
        available_at: row.try_get("available_at")?,
    })
}
