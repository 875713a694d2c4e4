//! Every statement the PostgreSQL store runs. Each takes any executor (a
//! pool, a connection, or a caller's open transaction) and is one round
//! trip (but `list_settled_tasks`, a short transaction of its own).
//!
//! - `idempotency_keys.rs`: key records, claims (with their tasks) and
//!   cleanup.
//! - `twins.rs`: claims that write the earlier scope's keys too.
//! - `tasks.rs`: reading tasks and the queue's figures.
//! - `lifecycle.rs`: leases, renewals, completions, failures, cancels.
//! - `api_keys.rs`: the API keys.

use sqlx::{PgExecutor, Row, postgres::PgRow, types::Json};
use uuid::Uuid;

use super::super::{StorageError, object};
use crate::domain::TaskRecord;

/// The advisory lock under which tasks are numbered: creates hold it
/// shared from numbering to commit, ListTasks takes it exclusively to wait
/// them out. (An arbitrary constant; advisory locks are per database.)
macro_rules! seq_lock {
    () => {
        "111542441471865"
    };
}

mod api_keys;
mod idempotency_keys;
mod lifecycle;
mod tasks;
mod twins;

pub use api_keys::{api_keys, insert_api_key, revoke_api_key, rotate_api_key};
pub use idempotency_keys::{
    claim_keys, delete_keys_created_before, find_key, find_legacy_key, legacy_key_records_at,
    mark_legacy_key_records, now_minus,
};
pub use lifecycle::{
    Chosen, cancel_task, complete_task, complete_tasks, fail_task, lease_candidates, lease_chosen,
    renew_lease,
};
pub use tasks::{get_task, list_settled_tasks, list_tasks, queue_stats, recent_failures};
pub use twins::claim_keys_with_twins;

/// Checks that the database answers.
pub async fn ping(db: impl PgExecutor<'_>) -> Result<(), StorageError> {
    sqlx::query("SELECT 1").execute(db).await?;
    Ok(())
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
