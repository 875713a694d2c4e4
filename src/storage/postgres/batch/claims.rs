//! Concurrent CreateTask claims, sent to the database together: one
//! statement, one transaction, one commit for the whole batch (for each
//! retention in it: keyed and keyless claims go in statements of their
//! own). Each claim still gets exactly its own outcome:
//!
//! - claims of the same key in one batch: the first is sent, the others
//!   come to what a retry right after it would (replayed, or refused as a
//!   different request);
//! - a batch whose statement fails (a lock wait past the bound on one key,
//!   a lost connection) is retried one claim at a time, so one claim's
//!   failure is its own.

use std::{
    collections::{HashMap, hash_map::Entry},
    time::Duration,
};

use sqlx::PgPool;

use super::{
    super::{
        super::{Claimed, KeyClaim, StorageError, grouping::by_retention},
        queries,
    },
    engine::{BatchJob, Pending, PoolWithWakeups},
};

/// Claims: CreateTask's key records and tasks.
#[derive(Debug)]
pub(crate) struct Claims(pub(crate) PoolWithWakeups);

impl BatchJob for Claims {
    const NAME: &'static str = "claims";
    /// Two: a create's latency is mostly its commit's flush, which a
    /// second batch overlaps (one lane: creates no faster, with more idle).
    const LANES: usize = 2;
    type Item = KeyClaim;
    type Answer = Claimed;

    async fn send(&self, batch: Vec<Pending<KeyClaim, Claimed>>) {
        // One statement per retention (keyed and keyless claims), each with
        // its own outcome: a failing one is retried claim by claim without
        // touching the others, which are committed.
        let mut created = false;
        for (retention, group) in by_retention(batch, |p| p.item.retention) {
            created |= send_claims(&self.0.pool, group, retention).await;
        }
        if created {
            // This instance's pollers at once; the others through the
            // database.
            self.0.task_ready().await;
        }
    }
}

/// Sends one batch of claims of one retention and answers each; true if a
/// task was created.
async fn send_claims(
    pool: &PgPool,
    batch: Vec<Pending<KeyClaim, Claimed>>,
    retention: Duration,
) -> bool {
    // The first claim of each key goes to the database; later ones follow it.
    let mut leaders: Vec<Pending<KeyClaim, Claimed>> = Vec::with_capacity(batch.len());
    let mut followers: HashMap<usize, Vec<Pending<KeyClaim, Claimed>>> = HashMap::new();
    let mut by_key: HashMap<(&'static str, String), usize> = HashMap::new();
    for pending in batch {
        match by_key.entry((pending.item.scope, pending.item.key.clone())) {
            Entry::Occupied(leader) => followers.entry(*leader.get()).or_default().push(pending),
            Entry::Vacant(slot) => {
                slot.insert(leaders.len());
                leaders.push(pending);
            }
        }
    }
    let claims: Vec<KeyClaim> = leaders.iter().map(|p| p.item.clone()).collect();
    tracing::trace!(claims = claims.len(), "sending a batch of claims");
    match claim_keys(pool, &claims, retention).await {
        Ok(outcomes) => {
            let created = outcomes.iter().any(|o| matches!(o, Claimed::Created));
            for (index, (leader, outcome)) in leaders.into_iter().zip(outcomes).enumerate() {
                for follower in followers.remove(&index).unwrap_or_default() {
                    let _ = follower
                        .reply
                        .send(Ok(outcome.for_duplicate_of(&leader.item)));
                }
                let _ = leader.reply.send(Ok(outcome));
            }
            created
        }
        Err(error) if claims.len() == 1 && followers.is_empty() => {
            if let Some(leader) = leaders.pop() {
                let _ = leader.reply.send(Err(error));
            }
            false
        }
        Err(error) => {
            // One claim at a time, each with its own outcome; duplicates
            // after their leader, so they see its record.
            tracing::debug!(%error, claims = claims.len(), "a batch of claims failed; claiming one by one");
            let mut singles = tokio::task::JoinSet::new();
            for (index, leader) in leaders.into_iter().enumerate() {
                let pool = pool.clone();
                let rest = followers.remove(&index).unwrap_or_default();
                singles.spawn(async move {
                    let mut created = false;
                    for pending in std::iter::once(leader).chain(rest) {
                        let outcome =
                            claim_keys(&pool, std::slice::from_ref(&pending.item), retention)
                                .await
                                .and_then(|mut outcomes| {
                                    outcomes.pop().ok_or_else(|| {
                                        StorageError::Corrupt("a claim answered no row".into())
                                    })
                                });
                        created |= matches!(outcome, Ok(Claimed::Created));
                        let _ = pending.reply.send(outcome);
                    }
                    created
                });
            }
            let mut created = false;
            while let Some(joined) = singles.join_next().await {
                created |= joined.unwrap_or(false);
            }
            created
        }
    }
}

/// Claims `claims` in one statement, or, when any has a twin to write too
/// (a rolling upgrade), in one transaction of a few.
async fn claim_keys(
    pool: &PgPool,
    claims: &[KeyClaim],
    retention: Duration,
) -> Result<Vec<Claimed>, StorageError> {
    if claims.iter().any(|claim| !claim.twins.is_empty()) {
        queries::claim_keys_with_twins(pool, claims, retention).await
    } else {
        queries::claim_keys(pool, claims, retention).await
    }
}
