//! Every statement the SQLite store runs. Times are stored as microseconds
//! since the Unix epoch, read from SQLite's own clock (`now!()`).
//!
//! Reads take any executor; writes take the writer's connection (or, in
//! tests, a connection inside a transaction of their own). Idempotency
//! records and tasks are here; the lifecycle's statements are in
//! `lifecycle.rs`, the API keys' in `keys.rs`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection, SqliteExecutor, sqlite::SqliteRow};
use uuid::Uuid;

use super::super::{
    ClaimOutcome, KeyLookup, NewKeyedTask, StorageError, StoredKey, TaskPage, object,
};
use crate::domain::TaskRecord;

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

mod keys;
mod lifecycle;

pub use keys::{ApiKeyRow, api_keys, insert_api_key, revoke_api_key};
pub use lifecycle::{
    LeaseRow, Leased, any_leasable, cancel_task, complete_task, fail_task, lease_in_transaction,
    renew_lease,
};

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
