//! Every statement the SQLite store runs. Times are stored as microseconds
//! since the Unix epoch, read from SQLite's own clock (`now!()`).
//!
//! Reads take any executor; writes take the writer's connection (or, in
//! tests, a connection inside a transaction of their own).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection, SqliteExecutor, sqlite::SqliteRow};
use uuid::Uuid;

use super::super::{
    ClaimOutcome, KeyLookup, LeaseOrder, NewKeyedTask, RetryRule, StorageError, StoredKey,
    TaskPage, expired_message_template, object, role, token_hash,
};
use crate::domain::{ApiKeyRecord, Completion, Failure, LeaseRef, Principal, TaskRecord};

/// SQLite's clock in microseconds, the unit of every stored time.
macro_rules! now {
    () => {
        "CAST(unixepoch('subsec') * 1000000 AS INTEGER)"
    };
}

/// The columns of a [`TaskRecord`], as [`task_record`] reads them.
macro_rules! task_columns {
    () => {
        "seq, task_id, agent_id, action, parameters, status, result, create_time, \
         attempt, update_time, error_message, lease_token, available_at"
    };
}

/// An owned [`NewKeyedTask`] in the form SQLite stores it, so it can cross
/// into the writer task.
#[derive(Debug)]
pub struct ClaimRow {
    scope: String,
    key: String,
    fingerprint: Vec<u8>,
    task_id: String,
    response: Vec<u8>,
    agent_id: String,
    action: String,
    parameters_json: String,
    status: i16,
    create_time: i64,
    retention: i64,
}

impl From<&NewKeyedTask<'_>> for ClaimRow {
    fn from(new: &NewKeyedTask<'_>) -> Self {
        Self {
            scope: new.scope.to_owned(),
            key: new.key.to_owned(),
            fingerprint: new.fingerprint.to_vec(),
            task_id: new.task_id.to_string(),
            response: new.response.to_vec(),
            agent_id: new.task.agent_id.clone(),
            action: new.task.action.clone(),
            parameters_json: new.task.parameters_json.clone(),
            status: new.status as i16,
            create_time: new.create_time.timestamp_micros(),
            retention: micros(new.retention),
        }
    }
}

/// Looks up a live key record with one indexed read, and reads the database
/// clock in the same statement.
pub async fn find_key(
    db: impl SqliteExecutor<'_>,
    scope: &str,
    key: &str,
    retention: Duration,
) -> Result<KeyLookup, StorageError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        now!(),
        " AS now, k.fingerprint, k.response \
         FROM (SELECT 1) AS one \
         LEFT JOIN idempotency_keys AS k \
           ON k.scope = ?1 AND k.key = ?2 AND k.created_at > ",
        now!(),
        " - ?3"
    ))
    .bind(scope)
    .bind(key)
    .bind(micros(retention))
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
        now: time(row.try_get("now")?)?,
    })
}

/// Claims the key and inserts its task in one IMMEDIATE transaction. On any
/// failure the statement's error is returned; the writer then makes sure the
/// transaction is gone.
pub async fn claim_in_transaction(
    connection: &mut SqliteConnection,
    claim: &ClaimRow,
) -> Result<ClaimOutcome, StorageError> {
    // IMMEDIATE takes the write lock now, waiting out another process's
    // writer for at most the busy timeout.
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *connection)
        .await?;
    let outcome = claim_key_and_insert_task(connection, claim).await?;
    let end = match outcome {
        ClaimOutcome::Claimed => "COMMIT",
        ClaimOutcome::AlreadyClaimed => "ROLLBACK",
    };
    sqlx::query(end).execute(&mut *connection).await?;
    Ok(outcome)
}

/// The claim's statements, inside the caller's transaction: claim the key
/// (replacing a record older than the retention, leaving a live one), then
/// insert the task if the key was taken.
pub async fn claim_key_and_insert_task(
    connection: &mut SqliteConnection,
    claim: &ClaimRow,
) -> Result<ClaimOutcome, StorageError> {
    let claimed = sqlx::query(concat!(
        "INSERT INTO idempotency_keys AS k (scope, key, fingerprint, task_id, response, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ",
        now!(),
        ") \
         ON CONFLICT (scope, key) DO UPDATE \
             SET fingerprint = excluded.fingerprint, task_id = excluded.task_id, \
                 response = excluded.response, created_at = excluded.created_at \
             WHERE k.created_at <= excluded.created_at - ?6 \
         RETURNING task_id"
    ))
    .bind(&claim.scope)
    .bind(&claim.key)
    .bind(&claim.fingerprint)
    .bind(&claim.task_id)
    .bind(&claim.response)
    .bind(claim.retention)
    .fetch_optional(&mut *connection)
    .await?;
    if claimed.is_none() {
        return Ok(ClaimOutcome::AlreadyClaimed);
    }
    sqlx::query(
        "INSERT INTO tasks \
             (task_id, agent_id, action, parameters, status, create_time, update_time, available_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6)",
    )
    .bind(&claim.task_id)
    .bind(&claim.agent_id)
    .bind(&claim.action)
    .bind(&claim.parameters_json)
    .bind(claim.status)
    .bind(claim.create_time)
    .execute(&mut *connection)
    .await?;
    Ok(ClaimOutcome::Claimed)
}

/// Reads one task.
pub async fn get_task(
    db: impl SqliteExecutor<'_>,
    task_id: Uuid,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE task_id = ?1"
    ))
    .bind(task_id.to_string())
    .fetch_optional(db)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Reads up to `limit` of an agent's tasks created after `after_seq`,
/// oldest first; a row is kept while the rows before it hold less than
/// `max_bytes` of parameters and results.
pub async fn list_tasks(
    db: impl SqliteExecutor<'_>,
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
        ", sum(length(CAST(parameters AS BLOB)) + coalesce(length(CAST(result AS BLOB)), 0)) \
                   OVER (ORDER BY seq) AS running, \
                length(CAST(parameters AS BLOB)) + coalesce(length(CAST(result AS BLOB)), 0) AS size \
             FROM tasks WHERE agent_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3 \
         ) WHERE running - size < ?4 ORDER BY seq"
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
    db: impl SqliteExecutor<'_>,
    duration: Duration,
) -> Result<DateTime<Utc>, StorageError> {
    let cutoff: i64 = sqlx::query_scalar(concat!("SELECT ", now!(), " - ?1"))
        .bind(micros(duration))
        .fetch_one(db)
        .await?;
    time(cutoff)
}

/// Deletes at most `limit` records of `scope` created before `cutoff`,
/// oldest first.
pub async fn delete_keys_created_before(
    connection: &mut SqliteConnection,
    scope: &str,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys WHERE rowid IN ( \
             SELECT rowid FROM idempotency_keys \
             WHERE scope = ?3 AND created_at < ?1 \
             ORDER BY created_at LIMIT ?2)",
    )
    .bind(cutoff.timestamp_micros())
    .bind(limit)
    .bind(scope)
    .execute(connection)
    .await?
    .rows_affected())
}

/// Checks that the connection answers.
pub async fn ping(db: impl SqliteExecutor<'_>) -> Result<(), StorageError> {
    sqlx::query("SELECT 1").execute(db).await?;
    Ok(())
}

/// Checks that the file can be read, not only that SQLite answers.
pub async fn read_check(db: impl SqliteExecutor<'_>) -> Result<(), StorageError> {
    sqlx::query("SELECT 1 FROM idempotency_keys LIMIT 1")
        .execute(db)
        .await?;
    Ok(())
}

/// An owned [`LeaseOrder`], to cross into the writer task.
#[derive(Debug)]
pub struct LeaseRow {
    worker_id: String,
    /// The actions as a JSON array, for `json_each`.
    actions: String,
    max_tasks: i64,
    lease_duration: i64,
    max_attempts: i32,
    expired_message: String,
}

impl From<&LeaseOrder<'_>> for LeaseRow {
    fn from(order: &LeaseOrder<'_>) -> Self {
        Self {
            worker_id: order.worker_id.to_owned(),
            actions: serde_json::Value::from(order.actions.to_vec()).to_string(),
            max_tasks: order.max_tasks,
            lease_duration: micros(order.lease_duration),
            max_attempts: order.max_attempts,
            expired_message: expired_message_template(order.max_attempts),
        }
    }
}

/// What a lease transaction did: the tasks it leased, and those whose
/// expired lease was their last allowed attempt, which it ended FAILED.
#[derive(Debug, Default)]
pub struct Leased {
    /// The leased tasks, RUNNING, oldest first.
    pub leased: Vec<TaskRecord>,
    /// The tasks ended FAILED.
    pub failed: Vec<Uuid>,
}

/// Whether any task is leasable now, read without the writer: so idle
/// workers polling for work do not queue behind the creates.
pub async fn any_leasable(
    db: impl SqliteExecutor<'_>,
    order: &LeaseRow,
) -> Result<bool, StorageError> {
    let found: Option<i64> = sqlx::query_scalar(concat!(
        "SELECT 1 FROM tasks WHERE status IN (1, 2) AND available_at <= ",
        now!(),
        " AND (json_array_length(?1) = 0 OR action IN (SELECT value FROM json_each(?1))) LIMIT 1"
    ))
    .bind(&order.actions)
    .fetch_optional(db)
    .await?;
    Ok(found.is_some())
}

/// Leases up to `order.max_tasks` available tasks, oldest first, in one
/// IMMEDIATE transaction (the single writer's, so no two callers get one
/// task). Status numbers: 1 queued, 2 running, 4 failed.
pub async fn lease_in_transaction(
    connection: &mut SqliteConnection,
    order: &LeaseRow,
) -> Result<Leased, StorageError> {
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *connection)
        .await?;
    let mut done = Leased::default();
    // Tasks ended FAILED take places of the limit: pick again while any
    // were, so a poll is not answered empty while others wait.
    loop {
        let failed_before = done.failed.len();
        let wanted = order.max_tasks - done.leased.len() as i64;
        lease_some(connection, order, wanted, &mut done).await?;
        if done.failed.len() == failed_before || done.leased.len() as i64 >= order.max_tasks {
            break;
        }
    }
    sqlx::query("COMMIT").execute(&mut *connection).await?;
    Ok(done)
}

/// One pick and lease of up to `wanted` tasks, inside the caller's
/// transaction.
async fn lease_some(
    connection: &mut SqliteConnection,
    order: &LeaseRow,
    wanted: i64,
    done: &mut Leased,
) -> Result<(), StorageError> {
    let picked: Vec<(String, i64, i32)> = sqlx::query_as(concat!(
        "SELECT task_id, status, attempt FROM tasks \
         WHERE status IN (1, 2) AND available_at <= ",
        now!(),
        " AND (json_array_length(?1) = 0 OR action IN (SELECT value FROM json_each(?1))) \
         ORDER BY available_at, seq LIMIT ?2"
    ))
    .bind(&order.actions)
    .bind(wanted)
    .fetch_all(&mut *connection)
    .await?;
    for (task_id, status, attempt) in picked {
        if status == 2 && attempt >= order.max_attempts {
            sqlx::query(concat!(
                "UPDATE tasks SET status = 4, error_message = format(?2, attempt), update_time = ",
                now!(),
                " WHERE task_id = ?1"
            ))
            .bind(&task_id)
            .bind(&order.expired_message)
            .execute(&mut *connection)
            .await?;
            done.failed.push(parse_id(&task_id)?);
            continue;
        }
        let row = sqlx::query(concat!(
            "UPDATE tasks SET status = 2, \
                 error_message = CASE WHEN status = 2 THEN format(?2, attempt) ELSE error_message END, \
                 attempt = attempt + 1, lease_token = ?3, worker_id = ?4, \
                 available_at = ",
            now!(),
            " + ?5, update_time = ",
            now!(),
            " WHERE task_id = ?1 RETURNING ",
            task_columns!()
        ))
        .bind(&task_id)
        .bind(&order.expired_message)
        .bind(Uuid::new_v4().to_string())
        .bind(&order.worker_id)
        .bind(order.lease_duration)
        .fetch_one(&mut *connection)
        .await?;
        done.leased.push(task_record(&row)?);
    }
    Ok(())
}

/// Extends a lease that is still the task's current one.
pub async fn renew_lease(
    connection: &mut SqliteConnection,
    lease: LeaseRef,
    lease_duration: Duration,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET available_at = ",
        now!(),
        " + ?3, update_time = ",
        now!(),
        " WHERE task_id = ?1 AND lease_token = ?2 AND status = 2 RETURNING ",
        task_columns!()
    ))
    .bind(lease.task_id.0.to_string())
    .bind(lease.token.to_string())
    .bind(micros(lease_duration))
    .fetch_optional(connection)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Marks the task SUCCEEDED (3) with its result, if the lease is current.
pub async fn complete_task(
    connection: &mut SqliteConnection,
    completion: &Completion,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET status = 3, result = ?3, error_message = '', update_time = ",
        now!(),
        " WHERE task_id = ?1 AND lease_token = ?2 AND status = 2 RETURNING ",
        task_columns!()
    ))
    .bind(completion.lease.task_id.0.to_string())
    .bind(completion.lease.token.to_string())
    .bind(&completion.result_json)
    .fetch_optional(connection)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Records a failed attempt, if the lease is current: FAILED (4) when
/// permanent or on the last allowed attempt, else queued (1) again after
/// `retry_after` or a random delay up to the attempt's backoff ceiling.
pub async fn fail_task(
    connection: &mut SqliteConnection,
    failure: &Failure,
    retry: &RetryRule,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET \
             status = CASE WHEN ?4 OR attempt >= ?5 THEN 4 ELSE 1 END, \
             error_message = ?3, \
             available_at = CASE WHEN ?4 OR attempt >= ?5 THEN available_at ELSE ",
        now!(),
        " + CAST(COALESCE(?6, min(?8, ?7 * (1 << min(attempt - 1, 30))) \
                    * ((random() & 9007199254740991) / 9007199254740992.0)) AS INTEGER) END, \
             update_time = ",
        now!(),
        " WHERE task_id = ?1 AND lease_token = ?2 AND status = 2 RETURNING ",
        task_columns!()
    ))
    .bind(failure.lease.task_id.0.to_string())
    .bind(failure.lease.token.to_string())
    .bind(&failure.message)
    .bind(failure.permanent)
    .bind(retry.max_attempts)
    .bind(failure.retry_after.map(micros))
    .bind(micros(retry.backoff_base))
    .bind(micros(retry.backoff_max))
    .fetch_optional(connection)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Cancels (5) a queued or running task.
pub async fn cancel_task(
    connection: &mut SqliteConnection,
    task_id: Uuid,
) -> Result<Option<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "UPDATE tasks SET status = 5, update_time = ",
        now!(),
        " WHERE task_id = ?1 AND status IN (1, 2) RETURNING ",
        task_columns!()
    ))
    .bind(task_id.to_string())
    .fetch_optional(connection)
    .await?
    .map(|row| task_record(&row))
    .transpose()
}

/// Every API key, revoked ones included, oldest first.
pub async fn api_keys(db: impl SqliteExecutor<'_>) -> Result<Vec<ApiKeyRecord>, StorageError> {
    let rows = sqlx::query(
        "SELECT name, token_hash, role, agent_ids, actions, created_at, revoked_at \
         FROM api_keys ORDER BY created_at, name",
    )
    .fetch_all(db)
    .await?;
    let list = |text: String| {
        serde_json::from_str::<Vec<String>>(&text)
            .map_err(|e| StorageError::Corrupt(format!("an api key's list: {e}")))
    };
    rows.iter()
        .map(|row| {
            Ok(ApiKeyRecord {
                principal: Principal {
                    name: row.try_get("name")?,
                    role: role(row.try_get("role")?)?,
                    agent_ids: list(row.try_get("agent_ids")?)?,
                    actions: list(row.try_get("actions")?)?,
                },
                token_hash: token_hash(row.try_get("token_hash")?)?,
                created_at: time(row.try_get("created_at")?)?,
                revoked_at: row
                    .try_get::<Option<i64>, _>("revoked_at")?
                    .map(time)
                    .transpose()?,
            })
        })
        .collect()
}

/// An owned API key record in the form SQLite stores it.
#[derive(Debug)]
pub struct ApiKeyRow {
    name: String,
    token_hash: Vec<u8>,
    role: &'static str,
    agent_ids: String,
    actions: String,
}

impl From<&ApiKeyRecord> for ApiKeyRow {
    fn from(key: &ApiKeyRecord) -> Self {
        let list = |items: &[String]| serde_json::Value::from(items.to_vec()).to_string();
        Self {
            name: key.principal.name.clone(),
            token_hash: key.token_hash.to_vec(),
            role: key.principal.role.as_str(),
            agent_ids: list(&key.principal.agent_ids),
            actions: list(&key.principal.actions),
        }
    }
}

/// Stores a new API key; `false` when the name is taken.
pub async fn insert_api_key(
    connection: &mut SqliteConnection,
    key: &ApiKeyRow,
) -> Result<bool, StorageError> {
    let inserted = sqlx::query(concat!(
        "INSERT INTO api_keys (name, token_hash, role, agent_ids, actions, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ",
        now!(),
        ") ON CONFLICT (name) DO NOTHING RETURNING name"
    ))
    .bind(&key.name)
    .bind(&key.token_hash)
    .bind(key.role)
    .bind(&key.agent_ids)
    .bind(&key.actions)
    .fetch_optional(connection)
    .await?;
    Ok(inserted.is_some())
}

/// Revokes a live key; `false` when there is none of that name.
pub async fn revoke_api_key(
    connection: &mut SqliteConnection,
    name: &str,
) -> Result<bool, StorageError> {
    Ok(sqlx::query(concat!(
        "UPDATE api_keys SET revoked_at = ",
        now!(),
        " WHERE name = ?1 AND revoked_at IS NULL"
    ))
    .bind(name)
    .execute(connection)
    .await?
    .rows_affected()
        == 1)
}

fn parse_id(id: &str) -> Result<Uuid, StorageError> {
    Uuid::parse_str(id).map_err(|e| StorageError::Corrupt(format!("task id {id:?}: {e}")))
}

/// A duration in microseconds, saturating.
pub fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

fn time(micros: i64) -> Result<DateTime<Utc>, StorageError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StorageError::Corrupt(format!("timestamp {micros} is out of range")))
}

fn task_record(row: &SqliteRow) -> Result<TaskRecord, StorageError> {
    let task_id = parse_id(&row.try_get::<String, _>("task_id")?)?;
    let json = |what: &str, text: &str| {
        serde_json::from_str(text)
            .map_err(|e| StorageError::Corrupt(format!("task {task_id} holds invalid JSON: {e}")))
            .and_then(|value| object(task_id, what, value))
    };
    let parameters: String = row.try_get("parameters")?;
    let result: Option<String> = row.try_get("result")?;
    Ok(TaskRecord {
        seq: row.try_get("seq")?,
        task_id,
        agent_id: row.try_get("agent_id")?,
        action: row.try_get("action")?,
        parameters: json("parameters", &parameters)?,
        status: i32::from(row.try_get::<i16, _>("status")?),
        result: result.as_deref().map(|r| json("result", r)).transpose()?,
        create_time: time(row.try_get("create_time")?)?,
        attempt: row.try_get("attempt")?,
        update_time: time(row.try_get("update_time")?)?,
        error_message: row.try_get("error_message")?,
        lease_token: row
            .try_get::<Option<String>, _>("lease_token")?
            .map(|token| parse_id(&token))
            .transpose()?,
        available_at: time(row.try_get("available_at")?)?,
    })
}
