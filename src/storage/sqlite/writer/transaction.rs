//! The writer task: what is queued runs in batches, each in one IMMEDIATE
//! transaction, claims together and every other job in a savepoint of its
//! own.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{Connection, SqliteConnection, sqlite::SqliteConnectOptions};
use tokio::sync::mpsc;

use super::{
    super::{
        super::{
            Claimed, StorageError,
            error::{SQLITE_ERROR, sqlite_code_of},
            grouping::by_retention,
        },
        queries::{self, ClaimRow},
    },
    jobs::{Answer, Claim, Item, Refused, WriteJob, is_busy, not_committed},
};

/// The most claims and jobs committed in one transaction.
const MAX_BATCH: usize = 256;

/// The most claims in one statement (SQLite binds at most 32,766 values).
const CHUNK: usize = 128;

/// Runs what is queued in batches, each in one transaction, until every
/// sender is gone. After a failed batch it makes sure no transaction is
/// left open; a connection that no longer works is dropped and reopened
/// for the next batch.
pub(super) async fn run(
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
    jobs: Vec<Box<dyn WriteJob>>,
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
    job: Box<dyn WriteJob>,
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
fn refuse_batch(claims: Vec<Claim>, jobs: Vec<Box<dyn WriteJob>>, error: &sqlx::Error) {
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
