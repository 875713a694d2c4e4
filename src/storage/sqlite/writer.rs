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

use super::{
    super::{Claimed, StorageError},
    queries::{self, ClaimRow},
};

/// How many writes may queue for the writer before callers wait to enqueue.
const WRITE_QUEUE: usize = 4096;
/// The most claims committed in one transaction.
const MAX_BATCH: usize = 256;
/// The most claims in one statement (SQLite binds at most 32,766 values).
const CHUNK: usize = 128;

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

/// A claim waiting for its batch, and where its answer goes.
#[derive(Debug)]
struct Claim {
    row: ClaimRow,
    reply: oneshot::Sender<Result<Claimed, StorageError>>,
}

/// What the writer is asked to do.
enum Item {
    /// A job of its own, in a transaction of its own.
    Job(Box<dyn Job>),
    /// A claim, committed with the claims queued with it.
    Claim(Claim),
}

/// A handle on the writer task; cloning it shares the one writer.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    jobs: mpsc::Sender<Item>,
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
        self.send(Item::Job(job), answer).await
    }

    /// Claims a key in the writer's next batch: every claim queued when the
    /// writer gets to it is committed in one transaction, with one fsync.
    /// Waits as [`Writer::run`] does.
    pub(super) async fn claim(&self, row: ClaimRow) -> Result<Claimed, StorageError> {
        let (reply, answer) = oneshot::channel();
        self.send(Item::Claim(Claim { row, reply }), answer).await
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

/// Runs jobs one at a time, and claims in batches, until every sender is
/// gone. After a failed job it makes sure no transaction is left open; a
/// connection that no longer works is dropped and reopened for the next
/// job.
async fn run(
    options: SqliteConnectOptions,
    connection: SqliteConnection,
    mut queue: mpsc::Receiver<Item>,
    healthy: Arc<AtomicBool>,
) {
    let mut connection = Some(connection);
    let mut next = None;
    loop {
        let item = match next.take() {
            Some(item) => item,
            None => match queue.recv().await {
                Some(item) => item,
                None => break,
            },
        };
        let conn = match connection.as_mut() {
            Some(conn) => conn,
            None => match SqliteConnection::connect_with(&options).await {
                Ok(conn) => connection.insert(conn),
                Err(error) => {
                    tracing::warn!(%error, "cannot reopen the SQLite writer connection");
                    healthy.store(false, Ordering::SeqCst);
                    match item {
                        Item::Job(job) => {
                            job.run(Err(error.into())).await;
                        }
                        Item::Claim(claim) => {
                            let _ = claim.reply.send(Err(error.into()));
                        }
                    }
                    continue;
                }
            },
        };
        let ok = match item {
            Item::Job(job) => {
                if job.abandoned() {
                    continue;
                }
                job.run(Ok(&mut *conn)).await
            }
            Item::Claim(first) => {
                // Every claim queued now joins the batch; the first other
                // job ends it and runs next.
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(Item::Claim(claim)) => batch.push(claim),
                        Ok(job) => {
                            next = Some(job);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                claim_batch(conn, batch).await
            }
        };
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

/// Commits a batch of claims in one IMMEDIATE transaction, each claim in a
/// savepoint of its own so that one claim's failure is its own; answers
/// each claim once the transaction is committed. Claims of the same key
/// run in order: the later ones find the first one's record. Returns
/// whether the transaction committed.
async fn claim_batch(connection: &mut SqliteConnection, batch: Vec<Claim>) -> bool {
    // A claim whose caller stopped waiting need not be made: nothing was
    // written, and a retry claims afresh.
    let batch: Vec<Claim> = batch.into_iter().filter(|c| !c.reply.is_closed()).collect();
    if batch.is_empty() {
        return true;
    }
    // IMMEDIATE takes the write lock now, waiting out another process's
    // writer for at most the busy timeout.
    if let Err(error) = sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *connection)
        .await
    {
        answer_all(batch, &error);
        return false;
    }
    let outcomes = match claim_together(connection, &batch).await {
        Ok(outcomes) => outcomes,
        Err(error) => {
            // Find out whose claim failed: undo, and claim one by one,
            // each in a savepoint, so that one failure is its own.
            tracing::debug!(%error, claims = batch.len(), "a batch of claims failed; claiming one by one");
            if let Err(error) = restart(connection).await {
                answer_all(batch, &error);
                return false;
            }
            let mut outcomes = Vec::with_capacity(batch.len());
            for claim in &batch {
                outcomes.push(claim_in_savepoint(connection, &claim.row).await);
            }
            outcomes
        }
    };
    if let Err(error) = sqlx::query("COMMIT").execute(&mut *connection).await {
        answer_all(batch, &error);
        return false;
    }
    tracing::trace!(claims = batch.len(), "committed a batch of claims");
    for (claim, outcome) in batch.into_iter().zip(outcomes) {
        let _ = claim.reply.send(outcome);
    }
    true
}

/// Every claim of the batch in a few statements, grouped by retention
/// (keyed and keyless records keep theirs); answers in the batch's order.
async fn claim_together(
    connection: &mut SqliteConnection,
    batch: &[Claim],
) -> Result<Vec<Result<Claimed, StorageError>>, StorageError> {
    let mut outcomes: Vec<Option<Claimed>> = vec![None; batch.len()];
    let mut retentions: Vec<i64> = batch.iter().map(|c| c.row.retention()).collect();
    retentions.sort_unstable();
    retentions.dedup();
    for retention in retentions {
        let (indices, rows): (Vec<usize>, Vec<&ClaimRow>) = batch
            .iter()
            .enumerate()
            .filter(|(_, c)| c.row.retention() == retention)
            .map(|(i, c)| (i, &c.row))
            .unzip();
        for chunk in indices.chunks(CHUNK).zip(rows.chunks(CHUNK)) {
            let claimed = queries::claim_keys(connection, chunk.1, retention).await?;
            for (index, outcome) in chunk.0.iter().zip(claimed) {
                outcomes[*index] = Some(outcome);
            }
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| StorageError::Corrupt("a claim got no answer".into())))
        .collect())
}

/// Undoes the batch's transaction and begins another.
async fn restart(connection: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::query("ROLLBACK").execute(&mut *connection).await?;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// One claim inside the batch's transaction, undone alone if it fails.
async fn claim_in_savepoint(
    connection: &mut SqliteConnection,
    row: &ClaimRow,
) -> Result<Claimed, StorageError> {
    sqlx::query("SAVEPOINT claim")
        .execute(&mut *connection)
        .await?;
    match queries::claim_key(connection, row).await {
        Ok(outcome) => {
            sqlx::query("RELEASE claim")
                .execute(&mut *connection)
                .await?;
            Ok(outcome)
        }
        Err(error) => {
            sqlx::query("ROLLBACK TO claim; RELEASE claim")
                .execute(&mut *connection)
                .await?;
            Err(error)
        }
    }
}

/// Answers every claim of a batch that could not be committed.
fn answer_all(batch: Vec<Claim>, error: &sqlx::Error) {
    for claim in batch {
        let failure = StorageError::from(sqlx::Error::Protocol(format!(
            "the batch of claims could not be committed: {error}"
        )));
        let _ = claim.reply.send(Err(failure));
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
