//! The single writer of the SQLite store.
//!
//! SQLite lets one transaction write at a time. Rather than let pooled
//! connections race for the write lock (and surface "database is locked"),
//! every write is a job sent to one writer task that owns one connection and
//! runs each job to completion, in order. Because the writer task, not the
//! request, runs each transaction, a cancelled request cannot leave one half
//! done. This module is only the machinery; the statements are in
//! [`super::queries`].

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::{Connection, SqliteConnection, sqlite::SqliteConnectOptions};
use tokio::sync::{mpsc, oneshot};

use super::super::StorageError;

/// How many writes may queue for the writer before callers wait to enqueue.
const WRITE_QUEUE: usize = 1024;

/// A future that borrows the writer's connection.
pub(super) type ConnFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// A unit of work for the writer.
trait Job: Send {
    /// Whether the caller stopped waiting: its work need not be done, since
    /// nothing was written and a retry executes afresh.
    fn abandoned(&self) -> bool;

    /// Runs on the writer's connection (or learns why there is none),
    /// answers the caller, and says whether it succeeded.
    fn run<'c>(
        self: Box<Self>,
        connection: Result<&'c mut SqliteConnection, StorageError>,
    ) -> ConnFuture<'c, bool>;
}

/// A caller's work and where its answer goes.
struct Work<T, F> {
    work: F,
    reply: oneshot::Sender<Result<T, StorageError>>,
}

impl<T, F> Job for Work<T, F>
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
        connection: Result<&'c mut SqliteConnection, StorageError>,
    ) -> ConnFuture<'c, bool> {
        let Work { work, reply } = *self;
        Box::pin(async move {
            let result = match connection {
                Ok(connection) => work(connection).await,
                Err(error) => Err(error),
            };
            let ok = result.is_ok();
            let _ = reply.send(result);
            ok
        })
    }
}

/// A handle on the writer task; cloning it shares the one writer.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    jobs: mpsc::Sender<Box<dyn Job>>,
    /// False while the writer has no working connection.
    healthy: Arc<AtomicBool>,
    /// How long a write may wait for the writer, queue included.
    wait: Duration,
}

impl std::fmt::Debug for dyn Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl Writer {
    /// Starts the writer task on `connection`; `options` reopen it after a
    /// failure. The task ends when every handle is dropped.
    pub(super) fn start(
        options: SqliteConnectOptions,
        connection: SqliteConnection,
        wait: Duration,
    ) -> Self {
        let (jobs, queue) = mpsc::channel(WRITE_QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        tokio::spawn(run(options, connection, queue, healthy.clone()));
        Self {
            jobs,
            healthy,
            wait,
        }
    }

    /// Runs `work` on the writer's connection and waits for its answer, at
    /// most the wait bound (queue included); past it the caller gets
    /// [`StorageError::WriterBusy`]. Work whose caller stopped waiting before
    /// it started is skipped.
    pub(super) async fn run<T, F>(&self, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> ConnFuture<'c, Result<T, StorageError>>
            + Send
            + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Work { work, reply });
        let round_trip = async {
            self.jobs
                .send(job)
                .await
                .map_err(|_| StorageError::Unavailable(sqlx::Error::WorkerCrashed))?;
            answer
                .await
                .map_err(|_| StorageError::Unavailable(sqlx::Error::WorkerCrashed))?
        };
        tokio::time::timeout(self.wait, round_trip)
            .await
            .map_err(|_| StorageError::WriterBusy(self.wait))?
    }

    /// Whether the writer task has stopped.
    pub(super) fn is_closed(&self) -> bool {
        self.jobs.is_closed()
    }

    /// Whether the writer's connection worked at its last use.
    pub(super) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }
}

/// Runs jobs one at a time until every sender is gone. After a failed job
/// it makes sure no transaction is left open; a connection that no longer
/// works is dropped and reopened for the next job.
async fn run(
    options: SqliteConnectOptions,
    connection: SqliteConnection,
    mut queue: mpsc::Receiver<Box<dyn Job>>,
    healthy: Arc<AtomicBool>,
) {
    let mut connection = Some(connection);
    while let Some(job) = queue.recv().await {
        if job.abandoned() {
            continue;
        }
        let conn = match connection.as_mut() {
            Some(conn) => conn,
            None => match SqliteConnection::connect_with(&options).await {
                Ok(conn) => connection.insert(conn),
                Err(error) => {
                    tracing::warn!(%error, "cannot reopen the SQLite writer connection");
                    healthy.store(false, Ordering::SeqCst);
                    job.run(Err(error.into())).await;
                    continue;
                }
            },
        };
        let ok = job.run(Ok(&mut *conn)).await;
        let working = ok || recover(conn).await;
        if !working {
            tracing::warn!("the SQLite writer connection is broken; reopening it");
            if let Some(conn) = connection.take() {
                let _ = conn.close().await;
            }
        }
        healthy.store(working, Ordering::SeqCst);
    }
    if let Some(conn) = connection {
        let _ = conn.close().await;
    }
}

/// After a failed job: leaves no transaction open and checks that the
/// connection still answers. SQLite may already have rolled back by itself
/// (after I/O errors or a full disk), in which case ROLLBACK fails with
/// SQLITE_ERROR, "no transaction is active", which is fine.
async fn recover(connection: &mut SqliteConnection) -> bool {
    match sqlx::query("ROLLBACK").execute(&mut *connection).await {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("1") => {}
        Err(_) => return false,
    }
    sqlx::query("SELECT 1")
        .execute(&mut *connection)
        .await
        .is_ok()
}
