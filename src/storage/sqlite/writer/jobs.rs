//! What the writer is sent, and how each item is answered once its
//! transaction has ended.

use std::{future::Future, pin::Pin};

use sqlx::SqliteConnection;
use tokio::sync::oneshot;

use super::super::{
    super::{
        Claimed, StorageError,
        error::{SQLITE_BUSY, SQLITE_LOCKED, sqlite_code_of},
    },
    queries::{ClaimRow, LeaseRow, TransactionLeases},
};
use crate::domain::{Completion, TaskRecord};

/// A future that borrows the writer's connection.
pub(crate) type ConnFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// A unit of work for the writer.
pub(super) trait WriteJob: Send {
    /// Whether the caller stopped waiting: its work need not be done, since
    /// nothing was written and a retry executes afresh.
    fn abandoned(&self) -> bool;

    /// Runs inside the writer's transaction and returns the answer to give
    /// once the transaction has ended.
    fn run<'c>(
        self: Box<Self>,
        connection: &'c mut SqliteConnection,
    ) -> ConnFuture<'c, Box<dyn Answer>>;

    /// Answers with `error`, the work not done.
    fn refuse(self: Box<Self>, error: StorageError);
}

/// A job's result, held until its transaction has ended.
pub(super) trait Answer: Send {
    /// Whether the job failed (its savepoint is then rolled back).
    fn failed(&self) -> bool;

    /// Gives the result if the transaction committed, an error otherwise.
    fn send(self: Box<Self>, committed: Result<(), &sqlx::Error>);
}

/// A caller's work and where its answer goes.
pub(super) struct Work<T, F> {
    /// What to run on the writer's connection.
    pub(super) work: F,
    /// Where its result goes.
    pub(super) reply: oneshot::Sender<Result<T, StorageError>>,
}

/// A result and where it goes, held until its transaction has ended.
pub(super) struct WorkAnswer<T> {
    result: Result<T, StorageError>,
    reply: oneshot::Sender<Result<T, StorageError>>,
}

impl<T: Send + 'static> Answer for WorkAnswer<T> {
    fn failed(&self) -> bool {
        self.result.is_err()
    }

    fn send(self: Box<Self>, committed: Result<(), &sqlx::Error>) {
        let result = match committed {
            Ok(()) => self.result,
            Err(error) => Err(not_committed(error)),
        };
        let _ = self.reply.send(result);
    }
}

impl<T, F> WriteJob for Work<T, F>
where
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut SqliteConnection) -> ConnFuture<'c, Result<T, StorageError>>
        + Send
        + 'static,
{
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn run<'c>(
        self: Box<Self>,
        connection: &'c mut SqliteConnection,
    ) -> ConnFuture<'c, Box<dyn Answer>> {
        let Work { work, reply } = *self;
        Box::pin(async move {
            let result = work(connection).await;
            Box::new(WorkAnswer { result, reply }) as Box<dyn Answer>
        })
    }

    fn refuse(self: Box<Self>, error: StorageError) {
        let _ = self.reply.send(Err(error));
    }
}

/// The error of a job whose transaction could not commit.
pub(super) fn not_committed(error: &sqlx::Error) -> StorageError {
    let described = sqlx::Error::Protocol(format!("the write could not be committed: {error}"));
    if is_busy(error) {
        // Another connection held the write lock: as a claim's own busy
        // error would say.
        StorageError::LockTimeout(described)
    } else {
        StorageError::from(described)
    }
}

/// A request the writer runs together with the others of its kind in its
/// batch, and where its answer goes.
#[derive(Debug)]
pub(super) struct Queued<R, T> {
    /// What is asked.
    pub(super) request: R,
    /// Where its outcome goes.
    pub(super) reply: oneshot::Sender<Result<T, StorageError>>,
}

impl<R, T: Send + 'static> Queued<R, T> {
    /// Its `result`, to be sent once the transaction has ended.
    pub(super) fn answer(self, result: Result<T, StorageError>) -> Box<dyn Answer> {
        Box::new(WorkAnswer {
            result,
            reply: self.reply,
        })
    }

    /// Answers with `error`, the request not run.
    pub(super) fn refuse(self, error: StorageError) {
        let _ = self.reply.send(Err(error));
    }
}

/// A claim of a key, committed with the claims queued with it.
pub(super) type Claim = Queued<ClaimRow, Claimed>;

/// A completion, run in one statement with the others of its batch.
pub(super) type Completing = Queued<Completion, Option<TaskRecord>>;

/// A lease order, sharing its batch's reads and writes with the orders of
/// the same shape.
pub(super) type Leasing = Queued<LeaseRow, TransactionLeases>;

/// What the writer is asked to do.
pub(super) enum Item {
    /// A job, in a savepoint of its batch's transaction.
    Job(Box<dyn WriteJob>),
    /// A claim, committed with the claims queued with it.
    Claim(Claim),
    /// A completion, in one statement with its batch's others.
    Complete(Completing),
    /// A lease order, read and written with its batch's others.
    Lease(Leasing),
}

/// The answer of a job that could not be started.
pub(super) struct Refused(pub(super) Option<(Box<dyn WriteJob>, StorageError)>);

impl Answer for Refused {
    fn failed(&self) -> bool {
        true
    }

    fn send(mut self: Box<Self>, _committed: Result<(), &sqlx::Error>) {
        if let Some((job, error)) = self.0.take() {
            job.refuse(error);
        }
    }
}

/// Whether SQLite answered SQLITE_BUSY or SQLITE_LOCKED: another connection
/// held the lock for the whole busy timeout.
pub(super) fn is_busy(error: &sqlx::Error) -> bool {
    matches!(sqlite_code_of(error), Some(SQLITE_BUSY | SQLITE_LOCKED))
}
