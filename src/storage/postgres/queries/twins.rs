//! Claims with twins: during a rolling upgrade, a record is written under
//! the earlier, per-API-key scope's keys too, in the claim's transaction,
//! so that instances of the earlier version see it.

use std::time::Duration;

use sqlx::{PgExecutor, PgPool, Row};

use super::idempotency_keys::{claim_keys, stored_key};
use crate::storage::{Claimed, KeyClaim, StorageError, StoredKey, micros};

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
