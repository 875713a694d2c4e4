//! The storage layer: every SQL statement oncely runs lives here, behind the
//! [`Store`] trait, with one implementation per backend: [`PgStore`]
//! (PostgreSQL, for production and several instances) and [`SqliteStore`]
//! (an embedded file, the zero-setup default for one process). Each backend
//! keeps its statements in a `queries` module of their own, apart from the
//! machinery that runs them.
//!
//! Query style: runtime-checked `sqlx::query` with binds, so building needs no
//! database; the integration tests exercise every statement on both backends.

#[macro_use]
mod status;
mod error;
mod events;
mod grouping;
pub mod postgres;
mod settings;
pub mod sqlite;

use std::{fmt, future::Future, time::Duration};

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use error::StorageError;
pub use events::TaskEvents;
pub use postgres::PgStore;
pub use settings::{Backend, DatabaseSettings, redact_url};
pub use sqlite::SqliteStore;
pub use status::StoredStatus;

use crate::domain::{ApiKeyRecord, Completion, Failure, LeaseRef, TaskRecord};

/// What the service needs from a database. Every method is one short unit
/// of work; `claim_key` is the only write that must be atomic, and each
/// backend makes it so.
pub trait Store: Clone + Send + Sync + fmt::Debug + 'static {
    /// Which backend this is and where, for logs (no secrets).
    fn describe(&self) -> String;

    /// Looks up a live key record (younger than `retention`) with one indexed
    /// read, and reads the database clock.
    fn find_key(
        &self,
        scope: &str,
        key: &str,
        retention: Duration,
    ) -> impl Future<Output = Result<KeyLookup, StorageError>> + Send;

    /// Claims the key and inserts its task atomically, or reads the live
    /// record that holds the key, in one round trip; concurrent claims are
    /// committed together (group commit). A record older than the
    /// retention is replaced; a live one is left untouched. Waits at most
    /// the in-flight bound for a concurrent claim of the same key, then
    /// fails with [`StorageError::LockTimeout`] (on SQLite, whose lock
    /// covers the file, [`StorageError::WriteLocked`] for a write lock held
    /// by another connection); a wait for anything else fails with
    /// [`StorageError::LockWait`] or, when the SQLite writer was busy with
    /// other work, [`StorageError::WriterBusy`].
    fn claim_key(
        &self,
        claim: KeyClaim,
    ) -> impl Future<Output = Result<Claimed, StorageError>> + Send;

    /// The earliest live record among `keys` of `scope` (keys of the
    /// earlier, per-API-key scope) whose task is for `agent_id`; records of
    /// other agents' tasks are not seen. One indexed read per key.
    fn find_legacy_key(
        &self,
        scope: &str,
        keys: &[String],
        agent_id: &str,
        retention: Duration,
    ) -> impl Future<Output = Result<Option<StoredKey>, StorageError>> + Send;

    /// When a record of the earlier, per-API-key scope was last written,
    /// at the latest (see `idempotency::legacy`); `None`: never.
    fn legacy_key_records_at(
        &self,
    ) -> impl Future<Output = Result<Option<DateTime<Utc>>, StorageError>> + Send;

    /// Notes that this instance writes records of the earlier scope now.
    fn mark_legacy_key_records(&self) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Reads one task.
    fn get_task(
        &self,
        task_id: Uuid,
    ) -> impl Future<Output = Result<Option<TaskRecord>, StorageError>> + Send;

    /// Reads up to `limit` of an agent's tasks created after `after_seq`,
    /// oldest first, stopping early once the tasks read hold `max_bytes` of
    /// parameters and results (the database drops the rest, so a page of
    /// large tasks costs its size, not its count).
    fn list_tasks(
        &self,
        agent_id: &str,
        after_seq: i64,
        limit: i64,
        max_bytes: i64,
    ) -> impl Future<Output = Result<TaskPage, StorageError>> + Send;

    /// The database clock minus `older_than`: the cutoff for cleanup.
    fn cleanup_cutoff(
        &self,
        older_than: Duration,
    ) -> impl Future<Output = Result<DateTime<Utc>, StorageError>> + Send;

    /// Deletes at most `limit` idempotency records of `scope` created before
    /// `cutoff`, in one short transaction; returns how many.
    fn delete_keys_created_before(
        &self,
        scope: &str,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> impl Future<Output = Result<u64, StorageError>> + Send;

    /// Deletes idempotency records created more than `older_than` ago, in
    /// batches of `batch_size`, each its own short transaction, so a large
    /// table is never locked for long. Only records of `scope`. Never deletes
    /// tasks. Returns how many records were deleted.
    fn delete_keys_older_than(
        &self,
        scope: &str,
        older_than: Duration,
        batch_size: i64,
    ) -> impl Future<Output = Result<u64, StorageError>> + Send {
        async move {
            // One cutoff for the whole run, so it ends even under steady
            // traffic.
            let cutoff = self.cleanup_cutoff(older_than).await?;
            let mut deleted = 0;
            loop {
                let batch = self
                    .delete_keys_created_before(scope, cutoff, batch_size)
                    .await?;
                deleted += batch;
                if batch < batch_size as u64 {
                    return Ok(deleted);
                }
            }
        }
    }

    /// Checks that the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Tasks by status and the wait of the oldest task ready to lease, for
    /// the metrics and the status page. Counts every task: read it at a
    /// modest interval, not per request.
    fn queue_stats(&self) -> impl Future<Output = Result<QueueStats, StorageError>> + Send;

    /// The pool's connections: how many are in use, how many idle.
    fn connections(&self) -> (u32, u32);

    /// The group commits made since the last call, by job and batch size,
    /// for the metrics to record; none for a store that does not batch.
    fn take_group_commits(&self) -> Vec<GroupCommits> {
        Vec::new()
    }

    /// The `limit` tasks that ended FAILED last, latest first (the status
    /// page).
    fn recent_failures(
        &self,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<TaskRecord>, StorageError>> + Send;

    /// The wake-ups this store raises when tasks become leasable or end.
    fn events(&self) -> &TaskEvents;

    /// Leases up to `order.max_tasks` available tasks (queued ones whose
    /// backoff is over, and running ones whose lease ran out), oldest
    /// first, each with a new token, in one transaction; none is handed to
    /// two callers and no caller waits on another's rows. An expired lease
    /// on the last allowed attempt ends its task FAILED instead. Returns the
    /// leased tasks, RUNNING, and how many run-out leases it found.
    fn lease_tasks(
        &self,
        order: &LeaseOrder<'_>,
    ) -> impl Future<Output = Result<LeasedTasks, StorageError>> + Send;

    /// Extends the lease to `lease_duration` from now, if it is still the
    /// task's current one (its token, and the task RUNNING). `None`: it is
    /// not, and nothing changed.
    fn renew_lease(
        &self,
        lease: LeaseRef,
        lease_duration: Duration,
    ) -> impl Future<Output = Result<Option<TaskRecord>, StorageError>> + Send;

    /// Marks the task SUCCEEDED with its result, if the lease is still the
    /// current one; `None` otherwise, with nothing changed.
    fn complete_task(
        &self,
        completion: &Completion,
    ) -> impl Future<Output = Result<Option<TaskRecord>, StorageError>> + Send;

    /// Records a failed attempt as `outcome` says (decided by
    /// `queue::retry`): the task ends FAILED, or is queued again after the
    /// delay. Only if the lease is still the current one, on the attempt
    /// the outcome was decided for; `None` otherwise, with nothing changed.
    fn fail_task(
        &self,
        failure: &Failure,
        outcome: &FailureOutcome,
    ) -> impl Future<Output = Result<Option<TaskRecord>, StorageError>> + Send;

    /// Cancels a queued or running task; `None` when it does not exist or has
    /// ended already, with nothing changed.
    fn cancel_task(
        &self,
        task_id: Uuid,
    ) -> impl Future<Output = Result<Option<TaskRecord>, StorageError>> + Send;

    /// Every API key, revoked ones included, oldest first.
    fn api_keys(&self) -> impl Future<Output = Result<Vec<ApiKeyRecord>, StorageError>> + Send;

    /// Stores a new API key; `false` when a key of that name exists.
    fn insert_api_key(
        &self,
        key: &ApiKeyRecord,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// Gives the live key named `name` the token hash `token_hash`; its
    /// current token stays accepted for `grace` (replacing any earlier
    /// one). Returns when that ends (now, for a zero grace), or `None` when
    /// no live key has that name.
    fn rotate_api_key(
        &self,
        name: &str,
        token_hash: &[u8; 32],
        grace: Duration,
    ) -> impl Future<Output = Result<Option<DateTime<Utc>>, StorageError>> + Send;

    /// Revokes the key named `name`; `false` when there is no such key or it
    /// was revoked before.
    fn revoke_api_key(&self, name: &str)
    -> impl Future<Output = Result<bool, StorageError>> + Send;
}

/// What a worker asks to lease.
#[derive(Debug, Clone, Copy)]
pub struct LeaseOrder<'a> {
    /// Who asks.
    pub worker_id: &'a str,
    /// The actions wanted; empty for any.
    pub actions: &'a [String],
    /// How many tasks at most.
    pub max_tasks: i64,
    /// How many bytes of parameters (as JSON) at most; the first task is
    /// leased whatever its size.
    pub max_bytes: i64,
    /// How long each lease lasts.
    pub lease_duration: Duration,
    /// The most leases a task may have; an expired lease on the last one
    /// fails the task.
    pub max_attempts: i32,
}

/// What a failed attempt does to its task, as `queue::retry` decided it;
/// a store only writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureOutcome {
    /// The attempt the decision is for: the write is fenced on it (as well
    /// as on the lease's token).
    pub attempt: i32,
    /// `None`: the task ends FAILED. Otherwise it is queued again, to be
    /// leasable after this delay.
    pub retry_in: Option<Duration>,
}

impl FailureOutcome {
    /// The status the task is left in.
    pub fn status(&self) -> StoredStatus {
        match self.retry_in {
            None => StoredStatus::Failed,
            Some(_) => StoredStatus::Queued,
        }
    }

    /// The delay in whole microseconds, `None` when the task ends.
    pub fn retry_in_micros(&self) -> Option<i64> {
        self.retry_in.map(micros)
    }
}

/// What a lease call did.
#[derive(Debug, Default)]
pub struct LeasedTasks {
    /// The leased tasks, RUNNING, oldest first.
    pub tasks: Vec<TaskRecord>,
    /// How many leases it found run out: of tasks leased again (in
    /// `tasks`) and of tasks ended FAILED on their last allowed attempt
    /// (not in `tasks`).
    pub expired: u64,
}

impl LeasedTasks {
    /// Whether the call leased or ended any task (committed work that its
    /// caller must be told of).
    pub fn changed_any(&self) -> bool {
        !self.tasks.is_empty() || self.expired > 0
    }
}

/// Group commits of one size, for the batch-size metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommits {
    /// What was batched: `claims`, `completions` or `leases`.
    pub job: &'static str,
    /// How many requests each batch held.
    pub size: usize,
    /// How many batches of that size were sent.
    pub batches: u64,
}

/// Tasks by status and the oldest wait, as [`Store::queue_stats`] reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueStats {
    /// Tasks of each status, in the order of [`StoredStatus::ALL`].
    pub by_status: [i64; 5],
    /// How long the oldest queued task that may be leased now has waited
    /// for a worker, in seconds; 0 when none.
    pub oldest_ready_seconds: f64,
}

impl QueueStats {
    /// Adds `count` tasks of stored status `code` (a number this build
    /// does not know is ignored).
    pub fn add(&mut self, code: i64, count: i64) {
        if let Some(place) = StoredStatus::from_code(code)
            .and_then(|status| StoredStatus::ALL.iter().position(|s| *s == status))
        {
            self.by_status[place] += count;
        }
    }

    /// How many tasks have `status`.
    pub fn count(&self, status: StoredStatus) -> i64 {
        StoredStatus::ALL
            .iter()
            .position(|s| *s == status)
            .map_or(0, |place| self.by_status[place])
    }
}

/// A page of one agent's tasks.
#[derive(Debug, Clone, Default)]
pub struct TaskPage {
    /// The tasks, oldest first.
    pub tasks: Vec<TaskRecord>,
    /// Whether the page ended at the size bound (more may follow).
    pub cut_by_size: bool,
}

/// A live idempotency record.
#[derive(Debug, Clone)]
pub struct StoredKey {
    /// The fingerprint of the request that claimed the key.
    pub fingerprint: Vec<u8>,
    /// The encoded response given to that request.
    pub response: Vec<u8>,
    /// How long the record stays live, as of the read.
    pub remaining: Duration,
}

impl StoredKey {
    /// The live record a row shows, from its nullable columns: none when
    /// the row holds no record; a remaining time past due counts as zero.
    fn from_columns(
        fingerprint: Option<Vec<u8>>,
        response: Option<Vec<u8>>,
        remaining_us: Option<i64>,
    ) -> Option<Self> {
        fingerprint
            .zip(response)
            .map(|(fingerprint, response)| Self {
                fingerprint,
                response,
                remaining: Duration::from_micros(remaining_us.unwrap_or(0).max(0).unsigned_abs()),
            })
    }
}

/// A duration in whole microseconds, saturating: how both stores take
/// durations in their statements.
pub fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// The result of looking a key up.
#[derive(Debug, Clone)]
pub struct KeyLookup {
    /// The key's record, if one exists and is younger than the retention.
    pub record: Option<StoredKey>,
    /// The database's clock at the time of the lookup.
    pub now: DateTime<Utc>,
}

/// Everything needed to claim a key and create its task in one go, owned
/// so that it can wait for its batch.
#[derive(Debug, Clone)]
pub struct KeyClaim {
    /// The key's scope: the RPC method, keyed or keyless.
    pub scope: &'static str,
    /// The client's key, or a keyless request's fingerprint in hex, after
    /// the agent's id (`"@<agent_id> <key>"`).
    pub key: String,
    /// The same record's keys in the earlier, per-API-key scope, to write
    /// too in the same transaction, so that instances of the earlier
    /// version see it (a rolling upgrade). If a live record of the same
    /// agent's task holds one, the claim comes to that record, and nothing
    /// of this one is kept; one held by another agent's task is left to
    /// it. PostgreSQL only: SQLite serves one process, so no earlier
    /// version runs beside it.
    pub twins: Vec<String>,
    /// The request's fingerprint (SHA-256).
    pub fingerprint: [u8; 32],
    /// The new task's id.
    pub task_id: Uuid,
    /// The new task's agent.
    pub agent_id: String,
    /// The new task's action.
    pub action: String,
    /// The new task's parameters as canonical JSON.
    pub parameters_json: String,
    /// The new task's creation time, as its response says.
    pub create_time: DateTime<Utc>,
    /// The encoded response to store for replays.
    pub response: Vec<u8>,
    /// Records older than this count as absent and may be replaced.
    pub retention: Duration,
}

/// What a claim came to.
#[derive(Debug, Clone)]
pub enum Claimed {
    /// The key and the new queued task were committed together.
    Created,
    /// A live record holds the key; nothing was written.
    Held(StoredKey),
    /// A record committed while the claim waited holds the key, but the
    /// claim's statement could not read it: read it with
    /// [`Store::find_key`].
    Unseen,
}

impl Claimed {
    /// What a request with the same key, claimed in the same batch right
    /// after `claim`, comes to.
    pub fn for_duplicate_of(&self, claim: &KeyClaim) -> Self {
        match self {
            Self::Created => Self::Held(StoredKey {
                fingerprint: claim.fingerprint.to_vec(),
                response: claim.response.clone(),
                remaining: claim.retention,
            }),
            other => other.clone(),
        }
    }
}

/// A key's role as stored.
fn role(name: &str) -> Result<crate::domain::Role, StorageError> {
    name.parse()
        .map_err(|e| StorageError::Corrupt(format!("api key role: {e}")))
}

/// A key's token hash as stored.
fn token_hash(bytes: Vec<u8>) -> Result<[u8; 32], StorageError> {
    bytes
        .try_into()
        .map_err(|_| StorageError::Corrupt("an api key's token hash is not 32 bytes".into()))
}

/// A stored JSON document that must be an object.
fn object(
    task_id: Uuid,
    what: &str,
    value: serde_json::Value,
) -> Result<serde_json::Map<String, serde_json::Value>, StorageError> {
    match value {
        serde_json::Value::Object(map) => Ok(map),
        other => Err(StorageError::Corrupt(format!(
            "task {task_id} has non-object {what} {other}"
        ))),
    }
}
