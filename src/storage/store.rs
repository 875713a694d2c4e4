//! The [`Store`] trait: what the service needs from a database, which
//! each backend implements.

use std::{fmt, future::Future, time::Duration};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    Claimed, FailureOutcome, GroupCommits, KeyClaim, KeyLookup, LeaseOrder, LeasedTasks,
    QueueStats, StorageError, StoredKey, TaskEvents, TaskPage,
};
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

    /// Checks that the database answers and can commit now (on PostgreSQL,
    /// a commit that waits for a synchronous standby, if one is required).
    fn ping(&self) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// What this instance knows of the database's history: whether what it
    /// remembers of the database (the replay cache) may still be answered.
    fn history(&self) -> super::DatabaseHistory {
        super::DatabaseHistory::untracked()
    }

    /// Reads where the database's history stands now (new connections do
    /// so by themselves), so that a database back after a blip with the
    /// same history is trusted again.
    fn check_history(&self) -> impl Future<Output = Result<(), StorageError>> + Send {
        async { Ok(()) }
    }

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
