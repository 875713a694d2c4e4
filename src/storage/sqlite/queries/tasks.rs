//! The statements that read tasks on SQLite: one task, an agent's page,
//! the latest failures and the queue's figures.

use sqlx::{Row, SqliteExecutor};
use uuid::Uuid;

use super::task_record;
use crate::{
    domain::TaskRecord,
    storage::{QueueStats, StorageError, TaskPage},
};

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
    TaskPage::from_rows(&rows, max_bytes, task_record)
}

/// The `limit` tasks that ended FAILED last, latest first.
pub async fn recent_failures(
    db: impl SqliteExecutor<'_>,
    limit: i64,
) -> Result<Vec<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE status = ",
        status!(failed),
        " ORDER BY update_time DESC LIMIT ?1"
    ))
    .bind(limit)
    .fetch_all(db)
    .await?
    .iter()
    .map(task_record)
    .collect()
}

/// Tasks by status, and the wait of the oldest queued task ready to lease
/// (read through the leasable index, whose predicate, `status!(leasable)`,
/// the query repeats so that SQLite sees it applies).
pub async fn queue_stats(db: impl SqliteExecutor<'_> + Copy) -> Result<QueueStats, StorageError> {
    let mut stats = QueueStats::default();
    let rows = sqlx::query("SELECT status, count(*) AS n FROM tasks GROUP BY status")
        .fetch_all(db)
        .await?;
    for row in &rows {
        stats.add(row.try_get("status")?, row.try_get("n")?);
    }
    stats.oldest_ready_seconds = sqlx::query_scalar(concat!(
        "SELECT coalesce((",
        now!(),
        " - min(available_at)) / 1e6, 0.0) FROM tasks \
         WHERE status IN ",
        status!(leasable),
        " AND status = ",
        status!(queued),
        " AND available_at <= ",
        now!()
    ))
    .fetch_one(db)
    .await?;
    Ok(stats)
}
