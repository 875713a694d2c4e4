//! Group commit on PostgreSQL: of claims, completions and leases.
//!
//! A [`Batcher`] sends what arrives concurrently to the database together,
//! through its [`Job`]: [`Claims`] for CreateTask, [`Completions`] for
//! CompleteTask (each completion still answers its own outcome; a repeat
//! of a task in one batch goes after the batch, on its own), [`Leases`] for
//! LeaseTasks (the orders of a batch take the tasks it chose in turn, and
//! it locks only those).
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

use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

use super::{
    super::{
        Claimed, GroupCommits, KeyClaim, LeaseOrder, LeasedTasks, StorageError, TaskEvents,
        grouping::{by_retention, groups},
    },
    notify::Notifier,
    queries,
};
use crate::domain::{
    Completion, TaskRecord,
    lease::{self, Candidate, Room, cut},
};

/// How many batches of one kind may be in the database at once.
const LANES: usize = 2;
/// The most items in one statement.
const MAX_BATCH: usize = 256;
/// How many items may wait for a lane before callers wait to enqueue.
const QUEUE: usize = 4096;

/// How many batches of each job and size were sent since the metrics last
/// took them (see
/// [`Store::take_group_commits`](crate::storage::Store::take_group_commits)); bounded by the jobs
/// times [`MAX_BATCH`] sizes, however long nobody takes them.
#[derive(Debug, Clone, Default)]
pub(super) struct Tally(Arc<std::sync::Mutex<HashMap<(&'static str, usize), u64>>>);

impl Tally {
    /// Counts a batch of `size` items of `job`.
    fn count(&self, job: &'static str, size: usize) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((job, size))
            .or_default() += 1;
    }

    /// The batches counted since the last call.
    pub(super) fn take(&self) -> Vec<GroupCommits> {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_iter()
        .map(|((job, size), batches)| GroupCommits { job, size, batches })
        .collect()
    }
}

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
    pub(super) fn start(job: J, tally: Tally) -> Self {
        let (queue, items) = mpsc::channel(QUEUE);
        tokio::spawn(run(Arc::new(job), items, tally));
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
async fn run<J: Job>(
    job: Arc<J>,
    mut items: mpsc::Receiver<Pending<J::Item, J::Answer>>,
    tally: Tally,
) {
    let lanes = Arc::new(Semaphore::new(LANES));
    loop {
        let Ok(lane) = lanes.clone().acquire_owned().await else {
            return;
        };
        // Waits for one item, then takes every one queued, up to the cap;
        // none: every handle is gone.
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if items.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let (job, tally) = (job.clone(), tally.clone());
        tokio::spawn(async move {
            let batch: Vec<_> = batch.into_iter().filter(|p| !p.reply.is_closed()).collect();
            if !batch.is_empty() {
                tally.count(J::NAME, batch.len());
                job.send(batch).await;
            }
            drop(lane);
        });
    }
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
        for (retention, group) in by_retention(batch, |p| p.item.retention) {
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

    /// Whether one statement can serve both.
    fn same_shape(&self, other: &Self) -> bool {
        self.actions == other.actions
            && self.lease_duration == other.lease_duration
            && self.max_attempts == other.max_attempts
    }
}

/// Leases: one LeaseTasks poll each. Orders that want the same actions on
/// the same terms share a statement, and [`cut`] decides which tasks each
/// takes before any is locked, so a statement locks only the tasks it
/// hands out.
#[derive(Debug)]
pub(super) struct Leases {
    target: Target,
    /// Held while a batch reads its candidates and chooses, so that this
    /// instance's batches in flight choose apart instead of racing for the
    /// same oldest rows.
    choosing: tokio::sync::Mutex<()>,
    /// The tasks chosen by this instance's batches whose statement has not
    /// ended: left out of the candidates the next batch reads.
    in_flight: Arc<std::sync::Mutex<HashSet<Uuid>>>,
}

impl Leases {
    pub(super) fn new(target: Target) -> Self {
        Self {
            target,
            choosing: tokio::sync::Mutex::new(()),
            in_flight: Arc::default(),
        }
    }
}

impl Job for Leases {
    const NAME: &'static str = "leases";
    type Item = LeaseRequest;
    type Answer = LeasedTasks;

    async fn send(&self, batch: Vec<Pending<LeaseRequest, LeasedTasks>>) {
        for group in groups(batch, |a, b| a.item.same_shape(&b.item)) {
            self.send_group(group).await;
        }
    }
}

impl Leases {
    async fn send_group(&self, group: Vec<Pending<LeaseRequest, LeasedTasks>>) {
        let orders: Vec<&LeaseRequest> = group.iter().map(|p| &p.item).collect();
        let outcome = self.lease(&orders).await;
        let (done, error) = match outcome {
            Ok(done) => (done, None),
            Err((error, done)) => (done, Some(error)),
        };
        let Some(error) = error else {
            for (pending, leased) in group.into_iter().zip(done) {
                let _ = pending.reply.send(Ok(leased));
            }
            return;
        };
        // What was leased before the failure is committed: its orders get
        // it. The orders that got nothing try again on their own, each with
        // its own outcome.
        let (served, mut empty): (Vec<_>, Vec<_>) = group
            .into_iter()
            .zip(done)
            .partition(|(_, leased)| leased.changed_any());
        for (pending, leased) in served {
            let _ = pending.reply.send(Ok(leased));
        }
        if empty.len() <= 1 {
            if let Some((pending, _)) = empty.pop() {
                let _ = pending.reply.send(Err(error));
            }
            return;
        }
        tracing::debug!(%error, orders = empty.len(), "a lease statement failed; leasing one order at a time");
        for (pending, _) in empty {
            if pending.reply.is_closed() {
                // Its caller gave up: lease nothing it would not receive.
                continue;
            }
            let outcome = match self.lease(&[&pending.item]).await {
                Ok(mut done) => Ok(done.pop().unwrap_or_default()),
                Err((error, mut done)) => match done.pop() {
                    Some(leased) if leased.changed_any() => Ok(leased),
                    _ => Err(error),
                },
            };
            let _ = pending.reply.send(outcome);
        }
    }

    /// Leases for `orders` (of one shape), in as many rounds as they need:
    /// each reads candidates, [`cut`]s them, and sends one statement that
    /// locks and leases the picks. On a failure, the error and what the
    /// rounds before it leased (committed).
    async fn lease(
        &self,
        orders: &[&LeaseRequest],
    ) -> Result<Vec<LeasedTasks>, (StorageError, Vec<LeasedTasks>)> {
        let mut done: Vec<LeasedTasks> = orders.iter().map(|_| LeasedTasks::default()).collect();
        let Some(shape) = orders.first() else {
            return Ok(done);
        };
        let mut rooms: Vec<Room> = orders
            .iter()
            .map(|o| Room::new(o.max_tasks, o.max_bytes))
            .collect();
        // Picks another statement took first: left out of later reads.
        let mut skipped: Vec<Uuid> = Vec::new();
        let (mut rounds, mut contended) = (0, 0);
        loop {
            rounds += 1;
            let wanted = lease::candidates_wanted(&rooms);
            let (candidates, decided, _reserved) =
                match self.choose(shape, &rooms, wanted, &skipped).await {
                    Ok(chosen) => chosen,
                    Err(error) => return Err((error, done)),
                };
            if decided.picks.is_empty() {
                if decided.left_behind {
                    self.wake_pollers().await;
                }
                break;
            }
            let chosen: Vec<queries::Chosen<'_>> = decided
                .picks
                .iter()
                .map(|pick| {
                    let candidate = &candidates[pick.candidate];
                    queries::Chosen {
                        candidate,
                        order: pick.order as i64 + 1,
                        worker_id: &orders[pick.order].worker_id,
                        ends: pick.ends,
                        message: candidate.message(shape.max_attempts),
                    }
                })
                .collect();
            let rows = match queries::lease_chosen(&self.target.pool, &chosen, shape.lease_duration)
                .await
            {
                Ok(rows) => rows,
                Err(error) => return Err((error, done)),
            };
            let mut answered: HashMap<Uuid, (i64, TaskRecord)> = rows
                .into_iter()
                .map(|(order, task)| (task.task_id, (order, task)))
                .collect();
            let skipped_before = skipped.len();
            for pick in &decided.picks {
                let candidate = &candidates[pick.candidate];
                let Some((_, task)) = answered.remove(&candidate.task_id) else {
                    skipped.push(candidate.task_id);
                    continue;
                };
                let (room, leased) = (&mut rooms[pick.order], &mut done[pick.order]);
                leased.expired += u64::from(candidate.running);
                if pick.ends {
                    // Committed: its waiters, here and elsewhere, may wake.
                    self.target.events.task_finished(task.task_id);
                    self.target.notifier.finished(task.task_id).await;
                } else {
                    room.take(candidate.size);
                    leased.tasks.push(task);
                }
            }
            if decided.left_behind {
                // Tasks past the orders' limits stay queued, unlocked:
                // pollers waiting here or elsewhere may take them now.
                self.wake_pollers().await;
            }
            let contested = skipped.len() > skipped_before;
            let read_full = candidates.len() as i64 >= wanted;
            if !lease::another_round(&rooms, &decided, contested, read_full) {
                break;
            }
            contended += usize::from(contested);
            if rounds >= lease::MAX_ROUNDS || contended >= lease::MAX_CONTENDED_ROUNDS {
                // Tasks may still wait for these orders: a poll answered
                // short is woken to read again.
                self.wake_pollers().await;
                break;
            }
        }
        Ok(done)
    }

    /// Wakes the pollers that wait for a task, on this instance and the
    /// others.
    async fn wake_pollers(&self) {
        self.target.events.task_ready();
        self.target.notifier.ready().await;
    }

    /// Reads the candidates for `rooms` and cuts them, apart from this
    /// instance's other batches in flight; the picks are reserved until
    /// the returned guard is dropped.
    async fn choose(
        &self,
        shape: &LeaseRequest,
        rooms: &[Room],
        wanted: i64,
        skipped: &[Uuid],
    ) -> Result<(Vec<Candidate>, lease::Cut, Reserved), StorageError> {
        let _choosing = self.choosing.lock().await;
        let excluded: Vec<Uuid> = {
            let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            in_flight.iter().chain(skipped).copied().collect()
        };
        let candidates =
            queries::lease_candidates(&self.target.pool, &shape.actions, wanted, &excluded).await?;
        let cut = cut(rooms, &candidates, shape.max_attempts);
        let reserved = Reserved::new(
            self.in_flight.clone(),
            cut.picks
                .iter()
                .map(|pick| candidates[pick.candidate].task_id)
                .collect(),
        );
        Ok((candidates, cut, reserved))
    }
}

/// Tasks one batch chose, held out of this instance's other batches'
/// reads until dropped (after its statement ended, whatever its outcome).
#[derive(Debug)]
struct Reserved {
    in_flight: Arc<std::sync::Mutex<HashSet<Uuid>>>,
    tasks: Vec<Uuid>,
}

impl Reserved {
    fn new(in_flight: Arc<std::sync::Mutex<HashSet<Uuid>>>, tasks: Vec<Uuid>) -> Self {
        in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(tasks.iter().copied());
        Self { in_flight, tasks }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        for task in &self.tasks {
            in_flight.remove(task);
        }
    }
}
