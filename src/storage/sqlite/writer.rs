//! The single writer of the SQLite store.
//!
//! SQLite lets one transaction write at a time. Rather than let pooled
//! connections race for the write lock (and surface "database is locked"),
//! every write is a job sent to one writer task that owns one connection.
//! Because the writer task, not the request, runs each transaction, a
//! cancelled request cannot leave one half done.
//!
//! Group commit: the writer takes every job queued when it gets to them
//! and runs them in one IMMEDIATE transaction, so they share one fsync.
//! Each job runs in a savepoint of its own, so that one job's failure is
//! its own, and every job is answered only once the transaction has
//! committed (or with an error if it could not). Claims of keys are run
//! together in a few statements. This module is only the machinery; the
//! statements are in [`super::queries`].

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{Connection, SqliteConnection, sqlite::SqliteConnectOptions};
use tokio::sync::{mpsc, oneshot};

use super::{
    super::{
        Claimed, StorageError,
        error::{SQLITE_BUSY, SQLITE_ERROR, SQLITE_LOCKED, sqlite_code_of},
        grouping::by_retention,
    },
    queries::{self, ClaimRow},
};

/// How many writes may queue for the writer before callers wait to enqueue.
const WRITE_QUEUE: usize = 4096;
/// The most claims and jobs committed in one transaction.
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
trait Answer: Send {
    /// Whether the job failed (its savepoint is then rolled back).
    fn failed(&self) -> bool;

    /// Gives the result if the transaction committed, an error otherwise.
    fn send(self: Box<Self>, committed: Result<(), &sqlx::Error>);
}

/// A caller's work and where its answer goes.
struct Work<T, F> {
    work: F,
    reply: oneshot::Sender<Result<T, StorageError>>,
}

/// A [`Work`]'s result and where it goes.
struct WorkAnswer<T> {
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
fn not_committed(error: &sqlx::Error) -> StorageError {
    let described = sqlx::Error::Protocol(format!("the write could not be committed: {error}"));
    if is_busy(error) {
        // Another connection held the write lock: as a claim's own busy
        // error would say.
        StorageError::LockTimeout(described)
    } else {
        StorageError::from(described)
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
    /// A job, in a savepoint of its batch's transaction.
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
    /// Since when the writer has waited for another connection's write
    /// lock (a BEGIN IMMEDIATE found it held, and none has succeeded
    /// since), if it has.
    locked_out: Arc<Mutex<Option<Instant>>>,
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
        let locked_out = Arc::new(Mutex::new(None));
        tokio::spawn(run(
            options,
            connection,
            queue,
            healthy.clone(),
            locked_out.clone(),
            wait,
        ));
        Self {
            jobs,
            healthy,
            locked_out,
            wait,
        }
    }

    /// Runs `work` on the writer's connection and waits for its answer, at
    /// most the wait bound (queue included); past it the caller gets
    /// [`StorageError::WriteLocked`] if the writer was then waiting for
    /// another connection's write lock, else [`StorageError::WriterBusy`].
    /// Work whose caller stopped waiting before it started is skipped.
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
    pub(super) fn is_closed(&self) -> bool {
        self.jobs.is_closed()
    }

    /// Whether the writer's connection worked at its last use.
    pub(super) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }
}

/// Runs what is queued in batches, each in one transaction, until every
/// sender is gone. After a failed batch it makes sure no transaction is
/// left open; a connection that no longer works is dropped and reopened
/// for the next batch.
async fn run(
    options: SqliteConnectOptions,
    connection: SqliteConnection,
    mut queue: mpsc::Receiver<Item>,
    healthy: Arc<AtomicBool>,
    locked_out: Arc<Mutex<Option<Instant>>>,
    lock_wait: Duration,
) {
    let mut connection = Some(connection);
    let mut items = Vec::with_capacity(MAX_BATCH);
    // Every item queued now joins the batch, up to the cap; none: every
    // sender is gone.
    while queue.recv_many(&mut items, MAX_BATCH).await > 0 {
        let mut claims = Vec::new();
        let mut jobs = Vec::new();
        for item in items.drain(..) {
            match item {
                Item::Claim(claim) if !claim.reply.is_closed() => claims.push(claim),
                Item::Job(job) if !job.abandoned() => jobs.push(job),
                // Callers that stopped waiting: nothing to do.
                Item::Claim(_) | Item::Job(_) => {}
            }
        }
        if claims.is_empty() && jobs.is_empty() {
            continue;
        }
        let conn = match connection.as_mut() {
            Some(conn) => conn,
            None => match SqliteConnection::connect_with(&options).await {
                Ok(conn) => connection.insert(conn),
                Err(error) => {
                    tracing::warn!(%error, "cannot reopen the SQLite writer connection");
                    healthy.store(false, Ordering::SeqCst);
                    refuse_batch(claims, jobs, &error);
                    continue;
                }
            },
        };
        let ok = run_batch(conn, &locked_out, lock_wait, claims, jobs).await;
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

/// BEGIN IMMEDIATE, waiting at most `wait` for another connection's write
/// lock; the connection's busy timeout is zero again afterwards.
async fn begin_waiting(
    connection: &mut SqliteConnection,
    wait: Duration,
) -> Result<sqlx::sqlite::SqliteQueryResult, sqlx::Error> {
    let millis = wait.as_millis().max(1);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA busy_timeout = {millis}"
    )))
    .execute(&mut *connection)
    .await?;
    let begun = sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *connection)
        .await;
    let reset = sqlx::query("PRAGMA busy_timeout = 0")
        .execute(&mut *connection)
        .await;
    let begun = begun?;
    reset?;
    Ok(begun)
}

/// Runs one batch in one IMMEDIATE transaction: the claims together, then
/// each job in a savepoint of its own; answers everyone once the
/// transaction has ended. Returns whether it committed.
async fn run_batch(
    connection: &mut SqliteConnection,
    locked_out: &Mutex<Option<Instant>>,
    lock_wait: Duration,
    claims: Vec<Claim>,
    jobs: Vec<Box<dyn Job>>,
) -> bool {
    // IMMEDIATE takes the write lock now. The connection's busy timeout is
    // zero, so a first BEGIN answers at once: with the lock free it takes
    // it; busy, it is the evidence that another connection holds it (which
    // may be a request with the same key). Only then does the writer count
    // as locked out (until a BEGIN succeeds), and wait for the lock, for at
    // most `lock_wait`. A BEGIN that is merely slow (a starved CPU) is not
    // taken for another connection's lock.
    let locked = || locked_out.lock().unwrap_or_else(PoisonError::into_inner);
    let mut begun = sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *connection)
        .await;
    if begun.as_ref().is_err_and(is_busy) {
        locked().get_or_insert_with(Instant::now);
        begun = begin_waiting(connection, lock_wait).await;
    }
    if !begun.as_ref().is_err_and(is_busy) {
        *locked() = None;
    }
    if let Err(error) = begun {
        refuse_batch(claims, jobs, &error);
        return false;
    }
    let outcomes = if claims.is_empty() {
        Vec::new()
    } else {
        match claim_together(connection, &claims).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                // Find out whose claim failed: undo, and claim one by one,
                // each in a savepoint, so that one failure is its own.
                tracing::debug!(%error, claims = claims.len(), "a batch of claims failed; claiming one by one");
                if let Err(error) = restart(connection).await {
                    refuse_batch(claims, jobs, &error);
                    return false;
                }
                let mut outcomes = Vec::with_capacity(claims.len());
                for claim in &claims {
                    outcomes.push(claim_in_savepoint(connection, &claim.row).await);
                }
                outcomes
            }
        }
    };
    let mut answers = Vec::with_capacity(jobs.len());
    let mut jobs = jobs.into_iter();
    while let Some(job) = jobs.next() {
        let (answer, intact) = job_in_savepoint(connection, job).await;
        answers.push(answer);
        if !intact {
            // The transaction is gone (SQLite ends it by itself after some
            // errors): the rest would run outside it. Refuse them instead.
            for job in jobs.by_ref() {
                answers.push(Box::new(Refused(Some((
                    job,
                    StorageError::from(sqlx::Error::Protocol(
                        "the write's transaction ended early".into(),
                    )),
                )))));
            }
        }
    }
    let committed = sqlx::query("COMMIT").execute(&mut *connection).await;
    match &committed {
        Ok(_) => {
            tracing::trace!(
                claims = claims.len(),
                jobs = answers.len(),
                "committed a batch"
            );
            for (claim, outcome) in claims.into_iter().zip(outcomes) {
                let _ = claim.reply.send(outcome);
            }
        }
        Err(error) => answer_all(claims, error),
    }
    let status = committed.as_ref().map(drop);
    for answer in answers {
        answer.send(status);
    }
    committed.is_ok()
}

/// One job inside the batch's transaction, undone alone if it fails; and
/// whether the transaction is still there.
async fn job_in_savepoint(
    connection: &mut SqliteConnection,
    job: Box<dyn Job>,
) -> (Box<dyn Answer>, bool) {
    if let Err(error) = sqlx::query("SAVEPOINT job").execute(&mut *connection).await {
        return (
            Box::new(Refused(Some((job, StorageError::from(error))))),
            false,
        );
    }
    let answer = job.run(connection).await;
    let end = if answer.failed() {
        "ROLLBACK TO job; RELEASE job"
    } else {
        "RELEASE job"
    };
    // If this fails the transaction is gone, and COMMIT fails too.
    let intact = sqlx::query(end).execute(&mut *connection).await.is_ok();
    (answer, intact)
}

/// The answer of a job that could not be started.
struct Refused(Option<(Box<dyn Job>, StorageError)>);

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

/// Every claim of the batch in a few statements, one group per retention
/// (see [`by_retention`]); answers in the batch's order.
async fn claim_together(
    connection: &mut SqliteConnection,
    batch: &[Claim],
) -> Result<Vec<Result<Claimed, StorageError>>, StorageError> {
    let mut outcomes: Vec<Option<Claimed>> = vec![None; batch.len()];
    for (retention, group) in by_retention(batch.iter().enumerate(), |(_, c)| c.row.retention()) {
        let (indices, rows): (Vec<usize>, Vec<&ClaimRow>) =
            group.into_iter().map(|(i, c)| (i, &c.row)).unzip();
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

/// Whether SQLite answered SQLITE_BUSY or SQLITE_LOCKED: another connection
/// held the lock for the whole busy timeout.
fn is_busy(error: &sqlx::Error) -> bool {
    matches!(sqlite_code_of(error), Some(SQLITE_BUSY | SQLITE_LOCKED))
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
        let _ = claim.reply.send(Err(not_committed(error)));
    }
}

/// Answers a whole batch that could not be run.
fn refuse_batch(claims: Vec<Claim>, jobs: Vec<Box<dyn Job>>, error: &sqlx::Error) {
    answer_all(claims, error);
    for job in jobs {
        job.refuse(not_committed(error));
    }
}

/// After a failed batch: leaves no transaction open and checks that the
/// connection still answers. SQLite may already have rolled back by itself
/// (after I/O errors or a full disk), in which case ROLLBACK fails with
/// SQLITE_ERROR, "no transaction is active", which is fine.
async fn recover(connection: &mut SqliteConnection) -> bool {
    match sqlx::query("ROLLBACK").execute(&mut *connection).await {
        Ok(_) => {}
        Err(error) if sqlite_code_of(&error) == Some(SQLITE_ERROR) => {}
        Err(_) => return false,
    }
    sqlx::query("SELECT 1")
        .execute(&mut *connection)
        .await
        .is_ok()
}
