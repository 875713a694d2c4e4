//! Every statement the PostgreSQL store runs. Each takes any executor (a
//! pool, a connection, or a caller's open transaction) and is one round
//! trip (but `list_settled_tasks`, a short transaction of its own). Idempotency records and tasks are here; the lifecycle's statements
//! are in `lifecycle.rs`, the API keys' in `keys.rs`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool, Row, postgres::PgRow, types::Json};
use uuid::Uuid;

use super::super::{
    Claimed, KeyClaim, KeyLookup, StorageError, StoredKey, TaskPage, micros, object,
};
use crate::domain::TaskRecord;

/// The advisory lock under which tasks are numbered: creates hold it
/// shared from numbering to commit, ListTasks takes it exclusively to wait
/// them out. (An arbitrary constant; advisory locks are per database.)
macro_rules! seq_lock {
    () => {
        "111542441471865"
    };
}

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

/// [`claim_keys`] for claims of which some have twins (see
/// [`KeyClaim::twins`]), in one transaction: the claims as usual, then the
/// twins of those that created their task (each twin key once per batch:
/// two agents' claims can share one), each replacing only a record older
/// than the retention. If a live record of the same agent's task holds a
/// twin (a request of the earlier version, committed first or waited for),
/// the transaction is rolled back and the batch sent again without that
/// claim, which comes to the record instead; a twin another agent's
/// record holds is left to it.
///
/// The claims' statement takes the numbering lock (shared) before the
/// twins may wait for a row lock, which a rolling upgrade's ListTasks can
/// queue behind: PostgreSQL's deadlock detector ends such a cycle after
/// `deadlock_timeout`, and the batch is retried claim by claim.
pub async fn claim_keys_with_twins(
    pool: &PgPool,
    claims: &[KeyClaim],
    retention: Duration,
) -> Result<Vec<Claimed>, StorageError> {
    let mut answered: Vec<Option<Claimed>> = claims.iter().map(|_| None).collect();
    loop {
        let active: Vec<usize> = (0..claims.len())
            .filter(|&i| answered[i].is_none())
            .collect();
        if active.is_empty() {
            break;
        }
        let batch: Vec<KeyClaim> = active.iter().map(|&i| claims[i].clone()).collect();
        let mut tx = pool.begin().await?;
        let outcomes = claim_keys(&mut *tx, &batch, retention).await?;
        let mut seen = std::collections::HashSet::new();
        let twins: Vec<(usize, &str)> = batch
            .iter()
            .zip(&outcomes)
            .enumerate()
            .filter(|(_, (_, outcome))| matches!(outcome, Claimed::Created))
            .flat_map(|(b, (claim, _))| claim.twins.iter().map(move |twin| (b, twin.as_str())))
            .filter(|&(b, twin)| seen.insert((batch[b].scope, twin)))
            .collect();
        let taken = insert_twins(&mut tx, &batch, &twins, retention).await?;
        let mut held = Vec::new();
        for &(b, twin) in &twins {
            if taken.contains(&(batch[b].scope.to_owned(), twin.to_owned()))
                || held.iter().any(|(h, _)| *h == b)
            {
                continue;
            }
            if let Some((stored, agent_id)) =
                find_twin_holder(&mut *tx, batch[b].scope, twin, retention).await?
                && agent_id == batch[b].agent_id
            {
                held.push((b, stored));
            }
        }
        if held.is_empty() {
            tx.commit().await?;
            for (b, outcome) in outcomes.into_iter().enumerate() {
                answered[active[b]] = Some(outcome);
            }
            break;
        }
        tx.rollback().await?;
        for (b, stored) in held {
            answered[active[b]] = Some(Claimed::Held(stored));
        }
    }
    answered
        .into_iter()
        .map(|outcome| {
            outcome.ok_or_else(|| StorageError::Corrupt("a claim went unanswered".into()))
        })
        .collect()
}

/// Writes `twins` (a claim of `batch` and a key), each replacing only a
/// record older than the retention; returns the (scope, key) of those
/// written.
async fn insert_twins(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    batch: &[KeyClaim],
    twins: &[(usize, &str)],
    retention: Duration,
) -> Result<std::collections::HashSet<(String, String)>, StorageError> {
    if twins.is_empty() {
        return Ok(std::collections::HashSet::new());
    }
    sqlx::query(
        "INSERT INTO idempotency_keys AS k (scope, key, fingerprint, task_id, response) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::uuid[], $5::bytea[]) \
         ORDER BY 1, 2 \
         ON CONFLICT (scope, key) DO UPDATE \
             SET fingerprint = EXCLUDED.fingerprint, task_id = EXCLUDED.task_id, \
                 response = EXCLUDED.response, created_at = now() \
             WHERE k.created_at <= now() - interval '1 microsecond' * $6 \
         RETURNING scope, key",
    )
    .bind(
        twins
            .iter()
            .map(|&(b, _)| batch[b].scope)
            .collect::<Vec<_>>(),
    )
    .bind(twins.iter().map(|&(_, twin)| twin).collect::<Vec<_>>())
    .bind(
        twins
            .iter()
            .map(|&(b, _)| batch[b].fingerprint.as_slice())
            .collect::<Vec<_>>(),
    )
    .bind(
        twins
            .iter()
            .map(|&(b, _)| batch[b].task_id)
            .collect::<Vec<_>>(),
    )
    .bind(
        twins
            .iter()
            .map(|&(b, _)| batch[b].response.as_slice())
            .collect::<Vec<_>>(),
    )
    .bind(micros(retention))
    .fetch_all(&mut **tx)
    .await?
    .iter()
    .map(|row| Ok((row.try_get("scope")?, row.try_get("key")?)))
    .collect()
}

/// The live record that holds `key`, with its task's agent.
async fn find_twin_holder(
    db: impl PgExecutor<'_>,
    scope: &str,
    key: &str,
    retention: Duration,
) -> Result<Option<(StoredKey, String)>, StorageError> {
    let row = sqlx::query(
        "SELECT k.fingerprint, k.response, t.agent_id, \
                (extract(epoch FROM k.created_at - now()) * 1000000)::bigint + $4 AS remaining_us \
         FROM idempotency_keys AS k \
         CROSS JOIN LATERAL (SELECT agent_id FROM tasks WHERE task_id = k.task_id LIMIT 1) AS t \
         WHERE k.scope = $1 AND k.key = $2 AND now() - k.created_at < $3::interval",
    )
    .bind(scope)
    .bind(key)
    .bind(retention)
    .bind(micros(retention))
    .fetch_optional(db)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(stored_key(&row)?
        .map(|stored| (stored, row.try_get("agent_id")))
        .map(|(stored, agent)| agent.map(|agent| (stored, agent)))
        .transpose()?)
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
fn stored_key(row: &PgRow) -> Result<Option<StoredKey>, StorageError> {
    Ok(StoredKey::from_columns(
        row.try_get("fingerprint")?,
        row.try_get("response")?,
        row.try_get("remaining_us")?,
    ))
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
/// (see [`list_settled_tasks`]), so a page never holds a task while an
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

/// The columns of a [`TaskRecord`], as [`task_record`] reads them.
macro_rules! task_columns {
    () => {
        "seq, task_id, agent_id, action, parameters, status, result, create_time, \
         attempt, update_time, error_message, lease_token, available_at"
    };
}

mod keys;
mod lifecycle;

pub use keys::{api_keys, insert_api_key, revoke_api_key, rotate_api_key};
pub use lifecycle::{
    Chosen, cancel_task, complete_task, complete_tasks, fail_task, lease_candidates, lease_chosen,
    renew_lease,
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
pub async fn queue_stats(
    db: impl PgExecutor<'_> + Copy,
) -> Result<crate::storage::QueueStats, StorageError> {
    let mut stats = crate::storage::QueueStats::default();
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
