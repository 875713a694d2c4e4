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

use super::super::{Identity, StorageError, object};
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

/// Checks that the database answers and can commit now.
pub async fn ping(db: impl PgExecutor<'_>) -> Result<(), StorageError> {
    // A transactional logical message writes WAL and takes a transaction
    // id, so its commit is a real one: flushed and, when the database
    // requires a synchronous standby, waiting for it, like a create's. It
    // needs no table and touches no row (no lock, no contention between
    // instances); logical decoding, if anyone runs it, sees the prefix. A
    // standby refuses it; a database set read-only would not, so that is
    // asked too.
    sqlx::query(
        "SELECT pg_logical_emit_message(true, 'oncely-health', '') \
         WHERE current_setting('transaction_read_only') = 'off'",
    )
    .fetch_optional(db)
    .await?
    .map(|_| ())
    .ok_or(StorageError::ReadOnly)
}

/// Where the database's history stands, as `db` sees it (see
/// [`crate::storage::DatabaseHistory`]); timeline and WAL position only on
/// a primary.
pub async fn identity(db: impl PgExecutor<'_>) -> Result<Identity, StorageError> {
    let (system, timeline, wal): (String, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT system_identifier::text, \
                CASE WHEN pg_is_in_recovery() THEN NULL ELSE \
                    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int4::int8 END, \
                CASE WHEN pg_is_in_recovery() THEN NULL ELSE \
                    (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8 END \
         FROM pg_control_system()",
    )
    .fetch_one(db)
    .await?;
    Ok(Identity {
        system,
        timeline,
        wal,
    })
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
