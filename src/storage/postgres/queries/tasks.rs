//! The statements that read tasks on PostgreSQL: one task, an agent's
//! page, the latest failures and the queue's figures.

use sqlx::{PgExecutor, PgPool, Row};
use uuid::Uuid;

use super::task_record;
use crate::{
    domain::TaskRecord,
    storage::{QueueStats, StorageError, TaskPage},
};

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

/// [`list_tasks`] once every create numbered so far has ended: in a
/// transaction of its own, it takes the numbering lock exclusively (waiting
/// out the creates that hold it shared, and holding off new ones for the
/// read), then reads with a snapshot taken after. Every task numbered below
/// the page's last is then committed or never will be, so a later page
/// that starts after it skips nothing.
pub async fn list_settled_tasks(
    pool: &PgPool,
    agent_id: &str,
    after_seq: i64,
    limit: i64,
    max_bytes: i64,
) -> Result<TaskPage, StorageError> {
    let mut tx = pool.begin().await?;
    sqlx::query(concat!("SELECT pg_advisory_xact_lock(", seq_lock!(), ")"))
        .execute(&mut *tx)
        .await?;
    let page = list_tasks(&mut *tx, agent_id, after_seq, limit, max_bytes).await?;
    tx.commit().await?;
    Ok(page)
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
    TaskPage::from_rows(&rows, max_bytes, task_record)
}

/// The `limit` tasks that ended FAILED last, latest first.
pub async fn recent_failures(
    db: impl PgExecutor<'_>,
    limit: i64,
) -> Result<Vec<TaskRecord>, StorageError> {
    sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE status = ",
        status!(failed),
        " ORDER BY update_time DESC LIMIT $1"
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
pub async fn queue_stats(db: impl PgExecutor<'_> + Copy) -> Result<QueueStats, StorageError> {
    let mut stats = QueueStats::default();
    let rows =
        sqlx::query("SELECT status::int8 AS status, count(*) AS n FROM tasks GROUP BY status")
            .fetch_all(db)
            .await?;
    for row in &rows {
        stats.add(row.try_get("status")?, row.try_get("n")?);
    }
    stats.oldest_ready_seconds = sqlx::query_scalar(concat!(
        "SELECT coalesce(extract(epoch FROM now() - min(available_at)), 0)::float8 \
         FROM tasks WHERE status IN ",
        status!(leasable),
        " AND status = ",
        status!(queued),
        " AND available_at <= now()"
    ))
    .fetch_one(db)
    .await?;
    Ok(stats)
}
