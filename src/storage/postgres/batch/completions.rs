//! Concurrent CompleteTask updates, sent together in one statement.

use std::collections::HashSet;

use super::{
    super::{super::StorageError, queries},
    engine::{BatchJob, Pending, PoolWithWakeups},
};
use crate::domain::{Completion, TaskRecord};

/// Completions: CompleteTask's updates of leased tasks.
#[derive(Debug)]
pub(crate) struct Completions(pub(crate) PoolWithWakeups);

impl BatchJob for Completions {
    const NAME: &'static str = "completions";
    /// One: lease + complete pairs are bound by PostgreSQL's CPU, and two
    /// lanes halved the batches, so each completion paid more of its
    /// statement's and commit's fixed cost (BENCHMARKS.md, issue 24).
    const LANES: usize = 1;
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
            self.0.task_finished(task.task_id).await;
        }
        let _ = pending.reply.send(outcome);
    }
}
