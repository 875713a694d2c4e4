//! The writer task: what is queued runs in batches, each in one IMMEDIATE
//! transaction: claims together, completions together, lease orders of one
//! shape together, and every other job in a savepoint of its own.

use std::{
    collections::HashSet,
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
            grouping::{by_retention, groups},
        },
        queries::{self, ClaimRow},
    },
    jobs::{
        Answer, Claim, Completing, Item, Leasing, Queued, Refused, WriteJob, is_busy, not_committed,
    },
};

/// The most claims and jobs committed in one transaction.
const MAX_BATCH: usize = 256;

/// The most claims in one statement (SQLite binds at most 32,766 values).
const CHUNK: usize = 128;

/// The most bytes of results one statement of completions carries (a
/// result may be up to the request size limit): their JSON is one bound
/// string, made and parsed whole.
const COMPLETION_BYTES: usize = 1024 * 1024;

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
        let mut batch = Batch::default();
        for item in items.drain(..) {
            batch.push(item);
        }
        if batch.is_empty() {
            continue;
        }
        let conn = match connection.as_mut() {
            Some(conn) => conn,
            None => match SqliteConnection::connect_with(&options).await {
                Ok(conn) => connection.insert(conn),
                Err(error) => {
                    tracing::warn!(%error, "cannot reopen the SQLite writer connection");
                    healthy.store(false, Ordering::SeqCst);
                    batch.refuse(&error);
                    continue;
                }
            },
        };
        let ok = run_batch(conn, &locked_out, lock_wait, batch).await;
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

/// What one batch holds, by kind; callers that stopped waiting left out.
#[derive(Default)]
struct Batch {
    claims: Vec<Claim>,
    completions: Vec<Completing>,
    leases: Vec<Leasing>,
    jobs: Vec<Box<dyn WriteJob>>,
}

impl Batch {
    fn push(&mut self, item: Item) {
        match item {
            Item::Claim(claim) if !claim.reply.is_closed() => self.claims.push(claim),
            Item::Complete(completing) if !completing.reply.is_closed() => {
                self.completions.push(completing);
            }
            Item::Lease(leasing) if !leasing.reply.is_closed() => self.leases.push(leasing),
            Item::Job(job) if !job.abandoned() => self.jobs.push(job),
            // Callers that stopped waiting: nothing to do.
            Item::Claim(_) | Item::Complete(_) | Item::Lease(_) | Item::Job(_) => {}
        }
    }

    fn is_empty(&self) -> bool {
        self.claims.is_empty()
            && self.completions.is_empty()
            && self.leases.is_empty()
            && self.jobs.is_empty()
    }

    /// Answers the whole batch, which could not be run, with `error`.
    fn refuse(self, error: &sqlx::Error) {
        answer_all(self.claims, error);
        answer_all(self.completions, error);
        answer_all(self.leases, error);
        for job in self.jobs {
            job.refuse(not_committed(error));
        }
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

/// Runs one batch in one IMMEDIATE transaction: the claims together, the
/// completions together, the lease orders of each shape together, then
/// each job in a savepoint of its own; answers everyone once the
/// transaction has ended. Returns whether it committed.
async fn run_batch(
    connection: &mut SqliteConnection,
    locked_out: &Mutex<Option<Instant>>,
    lock_wait: Duration,
    batch: Batch,
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
        batch.refuse(&error);
        return false;
    }
    let Batch {
        claims,
        completions,
        leases,
        jobs,
    } = batch;
    // Whether the transaction is still there: SQLite ends it by itself
    // after some errors, and what is left would then run outside it (a
    // SAVEPOINT would begin a transaction of its own), so it is refused
    // instead.
    let mut intact = true;
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
                    let rest = Batch {
                        claims,
                        completions,
                        leases,
                        jobs,
                    };
                    rest.refuse(&error);
                    return false;
                }
                let mut outcomes = Vec::with_capacity(claims.len());
                for claim in &claims {
                    outcomes.push(claim_alone(connection, &claim.request, &mut intact).await);
                }
                outcomes
            }
        }
    };
    let mut answers = Vec::with_capacity(completions.len() + leases.len() + jobs.len());
    complete_together(connection, completions, &mut intact, &mut answers).await;
    lease_together(connection, leases, &mut intact, &mut answers).await;
    for job in jobs {
        if intact {
            let (answer, still) = job_in_savepoint(connection, job).await;
            answers.push(answer);
            intact = still;
        } else {
            answers.push(Box::new(Refused(Some((job, ended_early())))));
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
    if let Err(error) = savepoint(connection).await {
        return (
            Box::new(Refused(Some((job, StorageError::from(error))))),
            false,
        );
    }
    let answer = job.run(connection).await;
    let intact = end_savepoint(connection, answer.failed()).await;
    (answer, intact)
}

/// Opens the savepoint a part of the batch runs in.
async fn savepoint(connection: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SAVEPOINT part")
        .execute(&mut *connection)
        .await
        .map(drop)
}

/// Ends the part's savepoint, undoing the part if it `failed`; whether the
/// transaction is still there (if this fails it is gone, and COMMIT fails
/// too).
async fn end_savepoint(connection: &mut SqliteConnection, failed: bool) -> bool {
    let end = if failed {
        "ROLLBACK TO part; RELEASE part"
    } else {
        "RELEASE part"
    };
    sqlx::query(end).execute(&mut *connection).await.is_ok()
}

/// The error of what was not run because the transaction had ended.
fn ended_early() -> StorageError {
    StorageError::from(sqlx::Error::Protocol(
        "the write's transaction ended early".into(),
    ))
}

/// The batch's completions: the first of each task together, in one
/// statement per [`COMPLETION_BYTES`] of results (in a savepoint); if one
/// fails, its completions one by one, each in a savepoint of its own, so
/// that one failure is its own. A repeat of a task (a retry racing its
/// first attempt) goes after, on its own, and finds the task as the batch
/// left it.
async fn complete_together(
    connection: &mut SqliteConnection,
    completions: Vec<Completing>,
    intact: &mut bool,
    answers: &mut Vec<Box<dyn Answer>>,
) {
    let mut seen = HashSet::new();
    let (mut leaders, repeats): (Vec<_>, Vec<_>) = completions
        .into_iter()
        .partition(|c| seen.insert(c.request.lease.task_id));
    let mut one_by_one = Vec::new();
    while !leaders.is_empty() {
        let mut chunk: Vec<Completing> = leaders.drain(..chunk_len(&leaders)).collect();
        if chunk.len() == 1 || !*intact {
            one_by_one.append(&mut chunk);
            continue;
        }
        *intact = savepoint(connection).await.is_ok();
        if !*intact {
            one_by_one.append(&mut chunk);
            continue;
        }
        let requests: Vec<_> = chunk.iter().map(|c| &c.request).collect();
        let together = queries::complete_tasks(connection, &requests).await;
        *intact = end_savepoint(connection, together.is_err()).await;
        match together {
            Ok(outcomes) => {
                for (completing, outcome) in chunk.into_iter().zip(outcomes) {
                    answers.push(completing.answer(Ok(outcome)));
                }
            }
            Err(error) => {
                tracing::debug!(%error, completions = chunk.len(), "a batch of completions failed; completing one by one");
                one_by_one.append(&mut chunk);
            }
        }
    }
    for completing in one_by_one.into_iter().chain(repeats) {
        let outcome = match alone(connection, intact).await {
            Ok(()) => {
                let outcome = queries::complete_task(connection, &completing.request).await;
                *intact = end_savepoint(connection, outcome.is_err()).await;
                outcome
            }
            Err(error) => Err(error),
        };
        answers.push(completing.answer(outcome));
    }
}

/// How many of `completions`, from the first, go in one statement: as many
/// as carry at most [`COMPLETION_BYTES`] of results, and at least one.
fn chunk_len(completions: &[Completing]) -> usize {
    let mut bytes = 0;
    completions
        .iter()
        .take_while(|c| {
            bytes += c.request.result_json.len();
            bytes <= COMPLETION_BYTES
        })
        .count()
        .max(1)
}

/// The batch's lease orders: those of one shape together (one read and one
/// write per round for all of them, in a savepoint); if that fails, one by
/// one, each in a savepoint of its own.
async fn lease_together(
    connection: &mut SqliteConnection,
    leases: Vec<Leasing>,
    intact: &mut bool,
    answers: &mut Vec<Box<dyn Answer>>,
) {
    for mut group in groups(leases, |a, b| a.request.same_shape(&b.request)) {
        if group.len() > 1 && *intact {
            *intact = savepoint(connection).await.is_ok();
            if *intact {
                let orders: Vec<_> = group.iter().map(|l| &l.request).collect();
                let together = queries::lease_in_transaction(connection, &orders).await;
                *intact = end_savepoint(connection, together.is_err()).await;
                match together {
                    Ok(done) => {
                        for (leasing, leased) in group.drain(..).zip(done) {
                            answers.push(leasing.answer(Ok(leased)));
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, orders = group.len(), "a batch of lease orders failed; leasing one by one");
                    }
                }
            }
        }
        for leasing in group {
            if leasing.reply.is_closed() {
                // Its caller gave up: lease nothing it would not receive.
                continue;
            }
            let outcome = match alone(connection, intact).await {
                Ok(()) => {
                    let outcome =
                        queries::lease_in_transaction(connection, &[&leasing.request]).await;
                    *intact = end_savepoint(connection, outcome.is_err()).await;
                    outcome.map(|mut done| done.pop().unwrap_or_default())
                }
                Err(error) => Err(error),
            };
            answers.push(leasing.answer(outcome));
        }
    }
}

/// Opens the savepoint of one request run on its own, if the transaction
/// is still there (an error otherwise, and then it is gone).
async fn alone(connection: &mut SqliteConnection, intact: &mut bool) -> Result<(), StorageError> {
    if !*intact {
        return Err(ended_early());
    }
    savepoint(connection).await.map_err(|error| {
        *intact = false;
        StorageError::from(error)
    })
}

/// Every claim of the batch in a few statements, one group per retention
/// (see [`by_retention`]); answers in the batch's order.
async fn claim_together(
    connection: &mut SqliteConnection,
    batch: &[Claim],
) -> Result<Vec<Result<Claimed, StorageError>>, StorageError> {
    let mut outcomes: Vec<Option<Claimed>> = vec![None; batch.len()];
    for (retention, group) in by_retention(batch.iter().enumerate(), |(_, c)| c.request.retention())
    {
        let (indices, rows): (Vec<usize>, Vec<&ClaimRow>) =
            group.into_iter().map(|(i, c)| (i, &c.request)).unzip();
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
async fn claim_alone(
    connection: &mut SqliteConnection,
    row: &ClaimRow,
    intact: &mut bool,
) -> Result<Claimed, StorageError> {
    alone(connection, intact).await?;
    let outcome = queries::claim_key(connection, row).await;
    *intact = end_savepoint(connection, outcome.is_err()).await;
    outcome
}

/// Answers every request of `batch`, which could not be committed.
fn answer_all<R, T: Send + 'static>(batch: Vec<Queued<R, T>>, error: &sqlx::Error) {
    for queued in batch {
        queued.refuse(not_committed(error));
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

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;
    use uuid::Uuid;

    use super::*;
    use crate::domain::{Completion, LeaseRef, TaskId};

    fn completing(result_bytes: usize) -> Completing {
        let (reply, _) = oneshot::channel();
        Completing {
            request: Completion {
                lease: LeaseRef {
                    task_id: TaskId(Uuid::new_v4()),
                    token: Uuid::new_v4(),
                },
                result: serde_json::Map::new(),
                result_json: "x".repeat(result_bytes),
            },
            reply,
        }
    }

    #[test]
    fn a_statement_of_completions_carries_at_most_its_bytes_of_results_and_at_least_one() {
        let sizes = |sizes: &[usize]| sizes.iter().map(|&n| completing(n)).collect::<Vec<_>>();
        let mb = COMPLETION_BYTES;
        assert_eq!(chunk_len(&sizes(&[10; 300])), 300);
        assert_eq!(chunk_len(&sizes(&[mb / 2, mb / 2, 1])), 2);
        assert_eq!(chunk_len(&sizes(&[mb / 2 + 1, mb / 2])), 1);
        assert_eq!(
            chunk_len(&sizes(&[2 * mb, 1])),
            1,
            "a result past the bound goes alone"
        );
    }
}
