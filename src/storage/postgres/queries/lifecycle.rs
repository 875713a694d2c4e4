//! The statements of the task lifecycle on PostgreSQL: leases, renewals,
//! completions, failures and cancellations, each one statement fenced by
//! the lease's token.

use std::time::Duration;

use sqlx::{PgExecutor, Row};
use uuid::Uuid;

use super::task_record;
use crate::{
    domain::{Completion, Failure, LeaseRef, TaskRecord},
    storage::{LeaseOrder, RetryRule, StorageError, expired_message_template},
};

/// What one lease statement did.
#[derive(Debug, Default)]
pub struct Leased {
    /// The leased tasks, RUNNING, oldest first.
    pub leased: Vec<TaskRecord>,
    /// How many picked tasks it ended FAILED instead (their last allowed
    /// lease had run out); they took places of the limit.
    pub failed: usize,
    /// The bytes of parameters the picked tasks hold.
    pub bytes: i64,
    /// How many tasks the statement locked for its orders but leased to
    /// none (an order's byte limit cut its share short); the same for every
    /// order of a statement. They stay queued.
    pub unpicked: i64,
}

/// Leases up to `order.max_tasks` available tasks in one statement; see
/// [`lease_batch`].
pub async fn lease_tasks(
    db: impl PgExecutor<'_>,
    order: &LeaseOrder<'_>,
) -> Result<Leased, StorageError> {
    Ok(lease_batch(db, std::slice::from_ref(order))
        .await?
        .pop()
        .unwrap_or_default())
}

/// Leases tasks for several orders in one statement (one transaction),
/// answered in their order. The orders must share their actions, lease
/// duration and attempt limit (the first order's are used); each has its
/// own worker, task limit and byte limit.
///
/// A CTE picks the oldest available tasks `FOR UPDATE SKIP LOCKED` (so the
/// limits hold and no caller waits on another's rows), as many as the
/// orders want together; the orders take them in turn, oldest first, each
/// up to its task limit, then up to its byte limit (its first task
/// whatever its size: the rest stay queued); and the update leases exactly
/// those. A running task whose lease ran out on its last allowed attempt
/// is ended FAILED instead, and its waiters notified. Status numbers:
/// 1 queued, 2 running, 4 failed.
pub async fn lease_batch(
    db: impl PgExecutor<'_>,
    orders: &[LeaseOrder<'_>],
) -> Result<Vec<Leased>, StorageError> {
    let Some(shape) = orders.first() else {
        return Ok(Vec::new());
    };
    let rows = sqlx::query(concat!(
        "WITH orders AS ( \
             SELECT o.worker_id, o.max_tasks, o.max_bytes, o.ord, \
                    sum(o.max_tasks) OVER (ORDER BY o.ord) - o.max_tasks AS first_slot \
             FROM unnest($1::text[], $2::bigint[], $3::bigint[]) \
                 WITH ORDINALITY AS o(worker_id, max_tasks, max_bytes, ord) \
         ), locked AS ( \
             SELECT task_id, available_at, seq, \
                    CASE WHEN status = 2 AND attempt >= $5 THEN 0 \
                         ELSE octet_length(parameters::text) END AS size \
             FROM tasks \
             WHERE status IN (1, 2) AND available_at <= now() \
               AND (cardinality($4::text[]) = 0 OR action = ANY($4::text[])) \
             ORDER BY available_at, seq \
             LIMIT $8 \
             FOR UPDATE SKIP LOCKED \
         ), slotted AS ( \
             SELECT task_id, available_at, seq, size, \
                    row_number() OVER (ORDER BY available_at, seq) - 1 AS slot \
             FROM locked \
         ), sized AS ( \
             SELECT s.task_id, s.size, o.ord, o.worker_id, o.max_bytes, \
                    sum(s.size) OVER (PARTITION BY o.ord ORDER BY s.available_at, s.seq) AS running \
             FROM slotted AS s \
             JOIN orders AS o ON s.slot >= o.first_slot AND s.slot < o.first_slot + o.max_tasks \
         ), picked AS ( \
             SELECT task_id, ord, worker_id, running FROM sized \
             WHERE running - size = 0 OR running <= max_bytes \
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
                                  ELSE picked.worker_id END, \
                 available_at = CASE WHEN t.status = 2 AND t.attempt >= $5 THEN t.available_at \
                                     ELSE now() + $7::interval END, \
                 update_time = now() \
             FROM picked WHERE t.task_id = picked.task_id \
             RETURNING picked.ord, picked.running, t.* \
         ) \
         SELECT ord, running, \
                (SELECT count(*) FROM sized) - (SELECT count(*) FROM picked) AS unpicked, ",
        task_columns!(),
        ", CASE WHEN status = 4 \
                THEN pg_notify('oncely_tasks', 'finished:' || task_id)::text END \
         FROM changed ORDER BY ord, available_at, seq"
    ))
    .bind(orders.iter().map(|o| o.worker_id).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.max_tasks).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.max_bytes).collect::<Vec<_>>())
    .bind(shape.actions)
    .bind(shape.max_attempts)
    .bind(expired_message_template(shape.max_attempts))
    .bind(shape.lease_duration)
    .bind(orders.iter().map(|o| o.max_tasks.max(0)).sum::<i64>())
    .fetch_all(db)
    .await?;
    let mut done: Vec<Leased> = orders.iter().map(|_| Leased::default()).collect();
    for row in &rows {
        let ord: i64 = row.try_get("ord")?;
        let leased = usize::try_from(ord - 1)
            .ok()
            .and_then(|place| done.get_mut(place))
            .ok_or_else(|| StorageError::Corrupt(format!("a lease answered order {ord}")))?;
        leased.bytes = leased.bytes.max(row.try_get::<i64, _>("running")?);
        leased.unpicked = row.try_get("unpicked")?;
        let task = task_record(row)?;
        if task.status == 2 {
            leased.leased.push(task);
        } else {
            leased.failed += 1;
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
/// Notifies no one: the caller does, after the commit (see `notify.rs`).
pub async fn complete_task(
    db: impl PgExecutor<'_>,
    completion: &Completion,
) -> Result<Option<TaskRecord>, StorageError> {
    Ok(complete_tasks(db, std::slice::from_ref(completion))
        .await?
        .pop()
        .flatten())
}

/// [`complete_task`] for many completions in one statement (one
/// transaction), answered in their order: each task whose lease is current
/// is SUCCEEDED, the others are left alone and answer `None`. The tasks
/// must be distinct; they are fed in `task_id` order, which the plan keeps
/// (a nested loop over the primary key), so two batches should not
/// deadlock; if they ever did, PostgreSQL ends one and its batch is retried
/// one completion at a time.
pub async fn complete_tasks(
    db: impl PgExecutor<'_>,
    completions: &[Completion],
) -> Result<Vec<Option<TaskRecord>>, StorageError> {
    let rows = sqlx::query(concat!(
        "WITH input AS ( \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[]) \
                 WITH ORDINALITY AS c(task_id, token, result, ord) \
             ORDER BY task_id \
         ), done AS ( \
             UPDATE tasks AS t SET status = 3, result = c.result::jsonb, error_message = '', \
                                   update_time = now() \
             FROM input AS c \
             WHERE t.task_id = c.task_id AND t.lease_token = c.token AND t.status = 2 \
             RETURNING c.ord, t.* \
         ) \
         SELECT ord, ",
        task_columns!(),
        " FROM done"
    ))
    .bind(
        completions
            .iter()
            .map(|c| c.lease.task_id.0)
            .collect::<Vec<_>>(),
    )
    .bind(
        completions
            .iter()
            .map(|c| c.lease.token)
            .collect::<Vec<_>>(),
    )
    .bind(
        completions
            .iter()
            .map(|c| c.result_json.as_str())
            .collect::<Vec<_>>(),
    )
    .fetch_all(db)
    .await?;
    let mut done: Vec<Option<TaskRecord>> = completions.iter().map(|_| None).collect();
    for row in &rows {
        let ord: i64 = row.try_get("ord")?;
        let slot = usize::try_from(ord - 1)
            .ok()
            .and_then(|place| done.get_mut(place))
            .ok_or_else(|| StorageError::Corrupt(format!("a completion answered place {ord}")))?;
        *slot = Some(task_record(row)?);
    }
    Ok(done)
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
