//! Concurrent LeaseTasks polls: orders that want the same actions on the
//! same terms share a statement, and `domain::lease::cut` decides which
//! tasks each takes before any is locked.

use std::{collections::HashMap, time::Duration};

use uuid::Uuid;

use super::{
    super::{
        super::{LeaseOrder, LeasedTasks, StorageError, grouping::groups},
        queries,
    },
    engine::{BatchJob, Pending, PoolWithWakeups},
};
use crate::domain::{
    TaskRecord,
    lease::{self, Room, cut},
};

/// A lease order that can wait in a queue: [`LeaseOrder`], owned.
#[derive(Debug)]
pub(crate) struct LeaseRequest {
    pub(crate) worker_id: String,
    pub(crate) actions: Vec<String>,
    pub(crate) max_tasks: i64,
    pub(crate) max_bytes: i64,
    pub(crate) lease_duration: Duration,
    pub(crate) max_attempts: i32,
}

impl LeaseRequest {
    /// The batcher's owned copy of `order`.
    pub(crate) fn new(order: &LeaseOrder<'_>) -> Self {
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
pub(crate) struct Leases {
    target: PoolWithWakeups,
}

impl Leases {
    /// The lease job, writing through `target` and waking its waiters.
    pub(crate) fn new(target: PoolWithWakeups) -> Self {
        Self { target }
    }
}

impl BatchJob for Leases {
    const NAME: &'static str = "leases";
    /// One, as for completions: two lanes split the orders in two
    /// statements where one would do (BENCHMARKS.md, issue 24). So this
    /// instance's batches never race each other for the oldest rows; one
    /// that another instance took first is skipped (`SKIP LOCKED`, then
    /// left out of the next round's read).
    const LANES: usize = 1;
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
        let mut rounds = lease::Rounds::default();
        loop {
            let wanted = lease::candidates_wanted(&rooms);
            let candidates = match queries::lease_candidates(
                &self.target.pool,
                &shape.actions,
                wanted,
                &skipped,
            )
            .await
            {
                Ok(candidates) => candidates,
                Err(error) => return Err((error, done)),
            };
            let decided = cut(&rooms, &candidates, shape.max_attempts);
            if decided.picks.is_empty() {
                if decided.left_behind {
                    self.target.task_ready().await;
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
                    self.target.task_finished(task.task_id).await;
                } else {
                    room.take(candidate.size);
                    leased.tasks.push(task);
                }
            }
            if decided.left_behind {
                // Tasks past the orders' limits stay queued, unlocked:
                // pollers waiting here or elsewhere may take them now.
                self.target.task_ready().await;
            }
            let contested = skipped.len() > skipped_before;
            let read_full = candidates.len() as i64 >= wanted;
            match rounds.after(&rooms, &decided, contested, read_full) {
                lease::AfterRound::Again => {}
                lease::AfterRound::Done => break,
                lease::AfterRound::GiveUp => {
                    // Tasks may still wait for these orders: a poll
                    // answered short is woken to read again.
                    self.target.task_ready().await;
                    break;
                }
            }
        }
        Ok(done)
    }
}
