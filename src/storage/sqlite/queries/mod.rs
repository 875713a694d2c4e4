//! Every statement the SQLite store runs. Times are stored as microseconds
//! since the Unix epoch, read from SQLite's own clock (`now!()`).
//!
//! Reads take any executor; writes take the writer's connection (or, in
//! tests, a connection inside a transaction of their own).
//!
//! - `idempotency_keys.rs`: key records, claims (with their tasks) and
//!   cleanup.
//! - `tasks.rs`: reading tasks and the queue's figures.
//! - `lifecycle.rs`: leases, renewals, completions, failures, cancels.
//! - `api_keys.rs`: the API keys.

use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteExecutor, sqlite::SqliteRow};
use uuid::Uuid;

use super::super::{StorageError, object};
use crate::domain::TaskRecord;

/// SQLite's clock in microseconds, the unit of every stored time.
macro_rules! now {
    () => {
        "CAST(unixepoch('subsec') * 1000000 AS INTEGER)"
    };
}

mod api_keys;
mod idempotency_keys;
mod lifecycle;
mod tasks;

pub use api_keys::{ApiKeyRow, api_keys, insert_api_key, revoke_api_key, rotate_api_key};
pub use idempotency_keys::{
    ClaimRow, claim_key, claim_keys, delete_keys_created_before, find_key, find_legacy_key,
    legacy_key_records_at, mark_legacy_key_records, now_minus,
};
pub use lifecycle::{
    LeaseRow, TransactionLeases, any_leasable, cancel_task, complete_task, complete_tasks,
    fail_task, lease_in_transaction, renew_lease,
};
pub use tasks::{get_task, list_tasks, queue_stats, recent_failures};

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

pub use super::super::micros;

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
