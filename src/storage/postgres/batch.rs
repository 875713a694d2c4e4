//! Group commit of claims on PostgreSQL.
//!
//! Concurrent CreateTask claims are sent to the database together: one
//! statement, one transaction, one commit for the whole batch. A batch
//! starts as soon as a claim arrives and a lane is free (never waiting for
//! company when the server is idle) and takes every claim that queued
//! while the lanes were busy, so batches grow with the load. Each claim
//! still gets exactly its own outcome:
//!
//! - claims of the same key in one batch: the first is sent, the others
//!   come to what a retry right after it would (replayed, or refused as a
//!   different request);
//! - a batch whose statement fails (a lock wait past the bound on one key,
//!   a lost connection) is retried one claim at a time, so one claim's
//!   failure is its own.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::Arc,
};

use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    super::{Claimed, KeyClaim, StorageError, TaskEvents},
    notify::Notifier,
    queries,
};

/// How many batches may be in the database at once.
const LANES: usize = 2;
/// The most claims in one statement.
const MAX_BATCH: usize = 256;
/// How many claims may wait for a lane before callers wait to enqueue.
const QUEUE: usize = 4096;

/// A claim waiting for its batch, and where its answer goes.
#[derive(Debug)]
struct Pending {
    claim: KeyClaim,
    reply: oneshot::Sender<Result<Claimed, StorageError>>,
}

/// A handle on the batching task; cloning it shares the task.
#[derive(Debug, Clone)]
pub(super) struct ClaimBatcher {
    queue: mpsc::Sender<Pending>,
}

impl ClaimBatcher {
    /// Starts the batching task on `pool`; it ends when every handle is
    /// dropped.
    pub(super) fn start(pool: PgPool, notifier: Notifier, events: TaskEvents) -> Self {
        let (queue, claims) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, notifier, events, claims));
        Self { queue }
    }

    /// Claims in the next batch and waits for the outcome.
    pub(super) async fn claim(&self, claim: KeyClaim) -> Result<Claimed, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { claim, reply })
            .await
            .map_err(|_| StorageError::Unavailable(sqlx::Error::WorkerCrashed))?;
        answer
            .await
            .map_err(|_| StorageError::Unavailable(sqlx::Error::WorkerCrashed))?
    }
}

/// Takes claims as they come and sends them in batches, at most `LANES`
/// batches at once.
async fn run(
    pool: PgPool,
    notifier: Notifier,
    events: TaskEvents,
    mut claims: mpsc::Receiver<Pending>,
) {
    let lanes = Arc::new(Semaphore::new(LANES));
    loop {
        let Ok(lane) = lanes.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = claims.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match claims.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        let notifier = notifier.clone();
        let events = events.clone();
        tokio::spawn(async move {
            if send_batch(&pool, batch).await {
                // This instance's pollers at once; the others through
                // the database.
                events.task_ready();
                notifier.ready().await;
            }
            drop(lane);
        });
    }
}

/// Sends one batch and answers each of its claims; true if a task was
/// created.
async fn send_batch(pool: &PgPool, batch: Vec<Pending>) -> bool {
    // A claim whose caller stopped waiting need not be made: nothing was
    // written, and a retry claims afresh.
    let batch: Vec<Pending> = batch.into_iter().filter(|p| !p.reply.is_closed()).collect();
    if batch.is_empty() {
        return false;
    }
    // The first claim of each key goes to the database; later ones follow it.
    let mut leaders: Vec<Pending> = Vec::with_capacity(batch.len());
    let mut followers: HashMap<usize, Vec<Pending>> = HashMap::new();
    let mut by_key: HashMap<(&'static str, String), usize> = HashMap::new();
    for pending in batch {
        match by_key.entry((pending.claim.scope, pending.claim.key.clone())) {
            Entry::Occupied(leader) => followers.entry(*leader.get()).or_default().push(pending),
            Entry::Vacant(slot) => {
                slot.insert(leaders.len());
                leaders.push(pending);
            }
        }
    }
    let claims: Vec<KeyClaim> = leaders.iter().map(|p| p.claim.clone()).collect();
    tracing::trace!(claims = claims.len(), "sending a batch of claims");
    match queries::claim_keys(pool, &claims).await {
        Ok(outcomes) => {
            let created = outcomes.iter().any(|o| matches!(o, Claimed::Created));
            for (index, (leader, outcome)) in leaders.into_iter().zip(outcomes).enumerate() {
                for follower in followers.remove(&index).unwrap_or_default() {
                    let _ = follower
                        .reply
                        .send(Ok(outcome.for_duplicate_of(&leader.claim)));
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
                            queries::claim_keys(&pool, std::slice::from_ref(&pending.claim))
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
