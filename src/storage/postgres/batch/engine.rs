//! The batching engine: a [`Batcher`] takes what arrives while its lanes
//! are busy and hands it to its [`BatchJob`] as one batch. A batch starts
//! as soon as an item arrives and a lane is free (never waiting for
//! company when the server is idle) and takes every item that queued
//! while the lanes were busy, so batches grow with the load.

use std::{collections::HashMap, sync::Arc};

use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::super::{
    super::{GroupCommits, StorageError, TaskEvents},
    notify::Notifier,
};

/// The most items in one statement.
const MAX_BATCH: usize = 256;
/// How many items may wait for a lane before callers wait to enqueue.
const QUEUE: usize = 4096;

/// How many batches of each job and size were sent since the metrics last
/// took them (see [`crate::storage::Store::take_group_commits`]); bounded
/// by the jobs times [`MAX_BATCH`] sizes, however long nobody takes them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally(Arc<std::sync::Mutex<HashMap<(&'static str, usize), u64>>>);

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
    pub(crate) fn take(&self) -> Vec<GroupCommits> {
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
pub(crate) struct Pending<T, A> {
    /// What was submitted.
    pub(crate) item: T,
    /// Where its answer goes.
    pub(crate) reply: oneshot::Sender<Result<A, StorageError>>,
}

/// What is sent in batches, and how.
pub(crate) trait BatchJob: Send + Sync + 'static {
    type Item: Send + 'static;
    type Answer: Send + 'static;
    /// The job's name in the batch-size metric.
    const NAME: &'static str;
    /// How many of its batches may be in the database at once. One lane
    /// makes the largest batches (everything that arrived while the last
    /// one ran), and so the fewest statements and commits per item; more
    /// lanes overlap one batch's round trips with another's.
    const LANES: usize;

    /// Sends one batch and answers each of its items.
    fn send(
        &self,
        batch: Vec<Pending<Self::Item, Self::Answer>>,
    ) -> impl Future<Output = ()> + Send;
}

/// A handle on a batching task; cloning it shares the task.
#[derive(Debug)]
pub(crate) struct Batcher<J: BatchJob> {
    queue: mpsc::Sender<Pending<J::Item, J::Answer>>,
}

impl<J: BatchJob> Clone for Batcher<J> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<J: BatchJob> Batcher<J> {
    /// Starts the batching task; it ends when every handle is dropped.
    pub(crate) fn start(job: J, tally: Tally) -> Self {
        let (queue, items) = mpsc::channel(QUEUE);
        tokio::spawn(run(Arc::new(job), items, tally));
        Self { queue }
    }

    /// Sends `item` in the next batch and waits for its answer.
    pub(crate) async fn submit(&self, item: J::Item) -> Result<J::Answer, StorageError> {
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

/// Takes items as they come and sends them in batches, at most `J::LANES`
/// batches at once. An item whose caller stopped waiting is dropped before
/// its batch is sent: nothing was written, and a retry starts afresh.
async fn run<J: BatchJob>(
    job: Arc<J>,
    mut items: mpsc::Receiver<Pending<J::Item, J::Answer>>,
    tally: Tally,
) {
    let lanes = Arc::new(Semaphore::new(J::LANES));
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
pub(crate) struct PoolWithWakeups {
    /// The request pool.
    pub(crate) pool: PgPool,
    /// Other instances, through the database.
    pub(crate) notifier: Notifier,
    /// This instance's waiters.
    pub(crate) events: TaskEvents,
}

impl PoolWithWakeups {
    /// Wakes the workers that wait for a task, here at once and on every
    /// other instance through the database: a committed change queued one.
    pub(crate) async fn task_ready(&self) {
        self.events.task_ready();
        self.notifier.ready().await;
    }

    /// Wakes those who wait on `task_id`, here at once and on every other
    /// instance through the database: a committed change ended it.
    pub(crate) async fn task_finished(&self, task_id: uuid::Uuid) {
        self.events.task_finished(task_id);
        self.notifier.finished(task_id).await;
    }
}
