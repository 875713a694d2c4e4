//! Group commit on PostgreSQL: of claims, completions and leases.
//!
//! A [`Batcher`] sends what arrives concurrently to the database together,
//! through its [`Job`]: [`Claims`] for CreateTask, [`Completions`] for
//! CompleteTask (each completion still answers its own outcome; a repeat
//! of a task in one batch goes after the batch, on its own), [`Leases`] for
//! LeaseTasks (the orders of a batch take the tasks it locked in turn).
//!
//! Concurrent CreateTask claims are sent to the database together: one
//! statement, one transaction, one commit for the whole batch (for each
//! retention in it: keyed and keyless claims go in statements of their
//! own). A batch starts as soon as a claim arrives and a lane is free (never waiting for
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
    collections::{HashMap, HashSet, hash_map::Entry},
    sync::Arc,
    time::Duration,
};

use sqlx::PgPool;

use crate::domain::{Completion, TaskRecord};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    super::{Claimed, KeyClaim, LeaseOrder, StorageError, TaskEvents},
    notify::Notifier,
    queries::{self, Leased},
};

/// How many batches of one kind may be in the database at once.
const LANES: usize = 2;
/// The most items in one statement.
const MAX_BATCH: usize = 256;
/// How many items may wait for a lane before callers wait to enqueue.
const QUEUE: usize = 4096;

/// An item waiting for its batch, and where its answer goes.
#[derive(Debug)]
pub(super) struct Pending<T, A> {
    item: T,
    reply: oneshot::Sender<Result<A, StorageError>>,
}

/// What is sent in batches, and how.
pub(super) trait Job: Send + Sync + 'static {
    type Item: Send + 'static;
    type Answer: Send + 'static;
    /// The job's name in the batch-size metric.
    const NAME: &'static str;

    /// Sends one batch and answers each of its items.
    fn send(
        &self,
        batch: Vec<Pending<Self::Item, Self::Answer>>,
    ) -> impl Future<Output = ()> + Send;
}

/// A handle on a batching task; cloning it shares the task.
#[derive(Debug)]
pub(super) struct Batcher<J: Job> {
    queue: mpsc::Sender<Pending<J::Item, J::Answer>>,
}

impl<J: Job> Clone for Batcher<J> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<J: Job> Batcher<J> {
    /// Starts the batching task; it ends when every handle is dropped.
    pub(super) fn start(job: J) -> Self {
        let (queue, items) = mpsc::channel(QUEUE);
        tokio::spawn(run(Arc::new(job), items));
        Self { queue }
    }

    /// Sends `item` in the next batch and waits for its answer.
    pub(super) async fn submit(&self, item: J::Item) -> Result<J::Answer, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { item, reply })
            .await
            .map_err(|_| StorageError::Unavailable(sqlx::Error::WorkerCrashed))?;
        answer
            .await
            .map_err(|_| StorageError::Unavailable(sqlx::Error::WorkerCrashed))?
    }
}

/// Takes items as they come and sends them in batches, at most `LANES`
/// batches at once. An item whose caller stopped waiting is dropped before
/// its batch is sent: nothing was written, and a retry starts afresh.
async fn run<J: Job>(job: Arc<J>, mut items: mpsc::Receiver<Pending<J::Item, J::Answer>>) {
    let lanes = Arc::new(Semaphore::new(LANES));
    loop {
        let Ok(lane) = lanes.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = items.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match items.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let job = job.clone();
        tokio::spawn(async move {
            let batch: Vec<_> = batch.into_iter().filter(|p| !p.reply.is_closed()).collect();
            if !batch.is_empty() {
                crate::metrics::metrics().observe_batch(J::NAME, batch.len());
                job.send(batch).await;
            }
            drop(lane);
        });
    }
}

/// Splits a batch into the groups one statement can serve (`same` says
/// whether two items can share one), each non-empty and in arrival order.
fn groups<T, A>(
    batch: Vec<Pending<T, A>>,
    same: impl Fn(&T, &T) -> bool,
) -> Vec<Vec<Pending<T, A>>> {
    let mut groups: Vec<Vec<Pending<T, A>>> = Vec::new();
    for pending in batch {
        match groups.iter_mut().find(|g| same(&g[0].item, &pending.item)) {
            Some(group) => group.push(pending),
            None => groups.push(vec![pending]),
        }
    }
    groups
}

/// Where a job's batches go, and whom a commit wakes.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) pool: PgPool,
    /// Other instances, through the database.
    pub(super) notifier: Notifier,
    /// This instance's waiters.
    pub(super) events: TaskEvents,
}

/// Claims: CreateTask's key records and tasks.
#[derive(Debug)]
pub(super) struct Claims(pub(super) Target);

impl Job for Claims {
    const NAME: &'static str = "claims";
    type Item = KeyClaim;
    type Answer = Claimed;

    async fn send(&self, batch: Vec<Pending<KeyClaim, Claimed>>) {
        // One statement per retention (keyed and keyless claims), each with
        // its own outcome: a failing one is retried claim by claim without
        // touching the others, which are committed.
        let mut created = false;
        for group in groups(batch, |a, b| a.retention == b.retention) {
            let retention = group[0].item.retention;
            created |= send_claims(&self.0.pool, group, retention).await;
        }
        if created {
            // This instance's pollers at once; the others through the
            // database.
            self.0.events.task_ready();
            self.0.notifier.ready().await;
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
    match queries::claim_keys(pool, &claims, retention).await {
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
                        let outcome = queries::claim_keys(
                            &pool,
                            std::slice::from_ref(&pending.item),
                            retention,
                        )
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

/// Completions: CompleteTask's updates of leased tasks.
#[derive(Debug)]
pub(super) struct Completions(pub(super) Target);

impl Job for Completions {
    const NAME: &'static str = "completions";
    type Item = Completion;
    type Answer = Option<TaskRecord>;

    async fn send(&self, batch: Vec<Pending<Completion, Option<TaskRecord>>>) {
        // The first completion of each task goes in the batch; a repeat (a
        // retry racing its first attempt) goes after it, on its own, and
        // finds the task as the batch left it.
        let mut seen = HashSet::new();
        let (leaders, repeats): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|p| seen.insert(p.item.lease.task_id));
        let completions: Vec<Completion> = leaders.iter().map(|p| p.item.clone()).collect();
        match queries::complete_tasks(&self.0.pool, &completions).await {
            Ok(outcomes) => {
                for (pending, outcome) in leaders.into_iter().zip(outcomes) {
                    self.answer(pending, Ok(outcome)).await;
                }
            }
            Err(error) if leaders.len() == 1 => {
                if let Some(pending) = leaders.into_iter().next() {
                    self.answer(pending, Err(error)).await;
                }
            }
            Err(error) => {
                // One at a time, each with its own outcome.
                tracing::debug!(%error, completions = leaders.len(), "a batch of completions failed; completing one by one");
                for pending in leaders {
                    self.send_one(pending).await;
                }
            }
        }
        for pending in repeats {
            self.send_one(pending).await;
        }
    }
}

impl Completions {
    async fn send_one(&self, pending: Pending<Completion, Option<TaskRecord>>) {
        let outcome = queries::complete_task(&self.0.pool, &pending.item).await;
        self.answer(pending, outcome).await;
    }

    /// Wakes the task's waiters, here and on every instance, then answers.
    async fn answer(
        &self,
        pending: Pending<Completion, Option<TaskRecord>>,
        outcome: Result<Option<TaskRecord>, StorageError>,
    ) {
        if let Ok(Some(task)) = &outcome {
            self.0.events.task_finished(task.task_id);
            self.0.notifier.finished(task.task_id).await;
        }
        let _ = pending.reply.send(outcome);
    }
}

/// A lease order that can wait in a queue: [`LeaseOrder`], owned.
#[derive(Debug)]
pub(super) struct LeaseRequest {
    pub(super) worker_id: String,
    pub(super) actions: Vec<String>,
    pub(super) max_tasks: i64,
    pub(super) max_bytes: i64,
    pub(super) lease_duration: Duration,
    pub(super) max_attempts: i32,
}

impl LeaseRequest {
    pub(super) fn new(order: &LeaseOrder<'_>) -> Self {
        Self {
            worker_id: order.worker_id.to_owned(),
            actions: order.actions.to_vec(),
            max_tasks: order.max_tasks,
            max_bytes: order.max_bytes,
            lease_duration: order.lease_duration,
            max_attempts: order.max_attempts,
        }
    }

    fn order(&self) -> LeaseOrder<'_> {
        LeaseOrder {
            worker_id: &self.worker_id,
            actions: &self.actions,
            max_tasks: self.max_tasks,
            max_bytes: self.max_bytes,
            lease_duration: self.lease_duration,
            max_attempts: self.max_attempts,
        }
    }

    /// Whether one statement can serve both.
    fn same_shape(&self, other: &Self) -> bool {
        self.actions == other.actions
            && self.lease_duration == other.lease_duration
            && self.max_attempts == other.max_attempts
    }
}

/// Leases: one LeaseTasks poll each. Orders that want the same actions on
/// the same terms share a statement; the statement's tasks go to them in
/// turn.
#[derive(Debug)]
pub(super) struct Leases(pub(super) Target);

impl Job for Leases {
    const NAME: &'static str = "leases";
    type Item = LeaseRequest;
    type Answer = Leased;

    async fn send(&self, batch: Vec<Pending<LeaseRequest, Leased>>) {
        for group in groups(batch, LeaseRequest::same_shape) {
            self.send_group(group).await;
        }
    }
}

impl Leases {
    async fn send_group(&self, group: Vec<Pending<LeaseRequest, Leased>>) {
        let orders: Vec<LeaseOrder<'_>> = group.iter().map(|p| p.item.order()).collect();
        match queries::lease_batch(&self.0.pool, &orders).await {
            Ok(outcomes) => {
                // Tasks another order's byte limit left behind were in the
                // share of no one else: a poll that got nothing asks again,
                // on its own, rather than be answered empty while they wait.
                let left_behind = outcomes.iter().any(|o| o.unpicked > 0);
                for (pending, outcome) in group.into_iter().zip(outcomes) {
                    let outcome = if left_behind && outcome.leased.is_empty() && outcome.failed == 0
                    {
                        queries::lease_tasks(&self.0.pool, &pending.item.order()).await
                    } else {
                        Ok(outcome)
                    };
                    let _ = pending.reply.send(outcome);
                }
            }
            Err(error) if group.len() == 1 => {
                if let Some(pending) = group.into_iter().next() {
                    let _ = pending.reply.send(Err(error));
                }
            }
            Err(error) => {
                // One at a time, each with its own outcome.
                tracing::debug!(%error, orders = group.len(), "a batch of leases failed; leasing one by one");
                for pending in group {
                    let outcome = queries::lease_tasks(&self.0.pool, &pending.item.order()).await;
                    let _ = pending.reply.send(outcome);
                }
            }
        }
    }
}
