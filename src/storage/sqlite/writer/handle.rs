//! The handle on the writer task: callers send work and claims through
//! it and wait, at most the wait bound, for their answers.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{SqliteConnection, sqlite::SqliteConnectOptions};
use tokio::sync::{mpsc, oneshot};

use crate::domain::{Completion, TaskRecord};

use super::{
    super::{
        super::{Claimed, StorageError},
        queries::{ClaimRow, LeaseRow, TransactionLeases},
    },
    jobs::{ConnFuture, Item, Queued, Work, WriteJob},
    transaction::run,
};

/// How many writes may queue for the writer before callers wait to enqueue.
pub(crate) const WRITE_QUEUE: usize = 4096;

/// A handle on the writer task; cloning it shares the one writer.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    jobs: mpsc::Sender<Item>,
    /// False while the writer has no working connection.
    healthy: Arc<AtomicBool>,
    /// Since when the writer has waited for another connection's write
    /// lock (a BEGIN IMMEDIATE found it held, and none has succeeded
    /// since), if it has.
    locked_out: Arc<Mutex<Option<Instant>>>,
    /// How long a write may wait for the writer, queue included.
    wait: Duration,
}

impl std::fmt::Debug for dyn WriteJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl Writer {
    /// Starts the writer task on `connection`, on a thread of its own;
    /// `options` reopen it after a failure. The task ends when every
    /// handle is dropped.
    ///
    /// The thread is the writer's own so that, while the server's runtime
    /// is busy with calls, the writer never waits in its queue of ready
    /// tasks: every statement of a batch is a round trip to SQLite's
    /// thread, and the write lock is held from the first to the commit.
    pub(crate) fn start(
        options: SqliteConnectOptions,
        connection: SqliteConnection,
        wait: Duration,
    ) -> Result<Self, StorageError> {
        let (jobs, queue) = mpsc::channel(WRITE_QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let locked_out = Arc::new(Mutex::new(None));
        let writer = run(
            options,
            connection,
            queue,
            healthy.clone(),
            locked_out.clone(),
            wait,
        );
        let cannot = |error: std::io::Error| {
            StorageError::Config(format!("cannot start the SQLite writer's thread: {error}"))
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(cannot)?;
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || runtime.block_on(writer))
            .map_err(cannot)?;
        Ok(Self {
            jobs,
            healthy,
            locked_out,
            wait,
        })
    }

    /// Runs `work` on the writer's connection and waits for its answer, at
    /// most the wait bound (queue included); past it the caller gets
    /// [`StorageError::WriteLocked`] if the writer was then waiting for
    /// another connection's write lock, else [`StorageError::WriterBusy`].
    /// Work whose caller stopped waiting before it started is skipped.
    pub(crate) async fn run<T, F>(&self, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> ConnFuture<'c, Result<T, StorageError>>
            + Send
            + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn WriteJob> = Box::new(Work { work, reply });
        self.send(Item::Job(job), answer).await
    }

    /// Claims a key in the writer's next batch: every claim queued when the
    /// writer gets to it is committed in one transaction, with one fsync.
    /// Waits as [`Writer::run`] does.
    pub(crate) async fn claim(&self, row: ClaimRow) -> Result<Claimed, StorageError> {
        self.queue(row, Item::Claim).await
    }

    /// Completes a task in the writer's next batch, in one statement with
    /// the batch's other completions; the task, if the lease was current.
    /// Waits as [`Writer::run`] does.
    pub(crate) async fn complete(
        &self,
        completion: Completion,
    ) -> Result<Option<TaskRecord>, StorageError> {
        self.queue(completion, Item::Complete).await
    }

    /// Leases for `order` in the writer's next batch: the batch's orders
    /// of one shape read their candidates together and are leased in one
    /// statement. Waits as [`Writer::run`] does.
    pub(crate) async fn lease(&self, order: LeaseRow) -> Result<TransactionLeases, StorageError> {
        self.queue(order, Item::Lease).await
    }

    /// Queues `request` as the item `kind` makes of it, to be run with the
    /// others of its kind in the writer's next batch, and waits for its
    /// answer as [`Writer::run`] does.
    async fn queue<R, T>(
        &self,
        request: R,
        kind: fn(Queued<R, T>) -> Item,
    ) -> Result<T, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.send(kind(Queued { request, reply }), answer).await
    }

    /// Queues `item` and waits for its `answer`, at most the wait bound.
    async fn send<T>(
        &self,
        item: Item,
        answer: oneshot::Receiver<Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        let round_trip = async {
            self.jobs
                .send(item)
                .await
                .map_err(|_| StorageError::Unavailable(sqlx::Error::WorkerCrashed))?;
            answer
                .await
                .map_err(|_| StorageError::Unavailable(sqlx::Error::WorkerCrashed))?
        };
        tokio::time::timeout(self.wait, round_trip)
            .await
            .map_err(|_| {
                let begun = *self
                    .locked_out
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if begun.is_some() {
                    StorageError::WriteLocked(self.wait)
                } else {
                    StorageError::WriterBusy(self.wait)
                }
            })?
    }

    /// Whether the writer task has stopped.
    pub(crate) fn is_closed(&self) -> bool {
        self.jobs.is_closed()
    }

    /// Whether the writer's connection worked at its last use.
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }
}
