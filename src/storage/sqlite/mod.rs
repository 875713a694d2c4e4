//! The embedded SQLite store: one file, WAL mode, one writer.
//!
//! Reads use a pool and, in WAL mode, never wait for the writer. Writes go
//! to the single writer task (`writer/`). The statements are in
//! [`queries`].
//!
//! SQLite is for one process: several instances on one file would contend
//! for its lock. Use PostgreSQL for more than one instance.

pub mod queries;
mod writer;

use std::{path::Path, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{
    Connection, SqliteConnection, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use uuid::Uuid;

use self::{
    queries::{ClaimRow, LeaseRow},
    writer::Writer,
};
use super::{
    Claimed, DatabaseSettings, FailureOutcome, KeyClaim, KeyLookup, LeaseOrder, LeasedTasks,
    StorageError, Store, StoredKey, TaskEvents, TaskPage, micros,
};
use crate::domain::{ApiKeyRecord, Completion, Failure, LeaseRef, TaskRecord};

/// The SQLite-backed store: a pool of readers and the writer.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    readers: SqlitePool,
    /// A reader of its own for health checks, so busy readers do not look
    /// like a dead database.
    health: SqlitePool,
    writer: Writer,
    /// Raised in process after each write commits: one process owns the file.
    events: TaskEvents,
    description: String,
}

impl SqliteStore {
    /// Opens (creating it if asked) the database file, applies the
    /// migrations and starts the writer.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StorageError> {
        let options = connect_options(settings)?;
        let path = options.get_filename().to_owned();
        if path.as_os_str().is_empty() || path == Path::new(":memory:") {
            return Err(StorageError::Config(format!(
                "{} is an in-memory SQLite database, which would lose every key on restart; \
                 use a file such as sqlite://oncely.db",
                settings.url
            )));
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent.filter(|_| settings.create_database) {
            tokio::fs::create_dir_all(parent).await.map_err(|e| {
                StorageError::Config(format!("cannot create {}: {e}", parent.display()))
            })?;
        }

        let migration_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&migration_pool)
            .await
            .map_err(StorageError::from_migration)?;
        migration_pool.close().await;

        // The writer waits for another connection's write lock only once it
        // knows the lock is held (see writer::run_batch).
        let writer_options = options.clone().busy_timeout(std::time::Duration::ZERO);
        let connection = SqliteConnection::connect_with(&writer_options).await?;
        let writer = Writer::start(writer_options, connection, settings.in_flight_wait)?;
        let readers = SqlitePoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options.clone());
        let health = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options);
        let shown = std::path::absolute(&path).unwrap_or(path);
        Ok(Self {
            readers,
            health,
            writer,
            events: TaskEvents::default(),
            description: format!("sqlite at {}", shown.display()),
        })
    }
}

/// How every connection to the file is opened.
fn connect_options(settings: &DatabaseSettings) -> Result<SqliteConnectOptions, StorageError> {
    Ok(SqliteConnectOptions::from_str(&settings.url)
        .map_err(StorageError::Internal)?
        .create_if_missing(settings.create_database)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: a commit the client was told about survives power loss, or
        // a retry after it would run the side effect again.
        .synchronous(SqliteSynchronous::Full)
        // Statement journals (kept while a statement of a batch's
        // transaction may still be undone) in memory, not in a new temp
        // file per transaction: the writer's batches wrote each page they
        // touched to one.
        .pragma("temp_store", "memory")
        .foreign_keys(true)
        .busy_timeout(settings.in_flight_wait))
}

impl Store for SqliteStore {
    fn describe(&self) -> String {
        self.description.clone()
    }

    #[tracing::instrument(skip_all)]
    async fn find_key(
        &self,
        scope: &str,
        key: &str,
        retention: Duration,
    ) -> Result<KeyLookup, StorageError> {
        queries::find_key(&self.readers, scope, key, retention).await
    }

    async fn find_legacy_key(
        &self,
        scope: &str,
        keys: &[String],
        agent_id: &str,
        retention: Duration,
    ) -> Result<Option<StoredKey>, StorageError> {
        queries::find_legacy_key(&self.readers, scope, keys, agent_id, retention).await
    }

    async fn legacy_key_records_at(&self) -> Result<Option<DateTime<Utc>>, StorageError> {
        queries::legacy_key_records_at(&self.readers).await
    }

    async fn mark_legacy_key_records(&self) -> Result<(), StorageError> {
        self.writer
            .run(|connection| Box::pin(queries::mark_legacy_key_records(connection)))
            .await
    }

    #[tracing::instrument(skip_all, fields(task_id = %claim.task_id))]
    async fn claim_key(&self, claim: KeyClaim) -> Result<Claimed, StorageError> {
        let outcome = self.writer.claim(ClaimRow::from(claim)).await?;
        if matches!(outcome, Claimed::Created) {
            self.events.task_ready();
        }
        Ok(outcome)
    }

    #[tracing::instrument(skip_all)]
    async fn get_task(&self, task_id: Uuid) -> Result<Option<TaskRecord>, StorageError> {
        queries::get_task(&self.readers, task_id).await
    }

    #[tracing::instrument(skip_all)]
    async fn list_tasks(
        &self,
        agent_id: &str,
        after_seq: i64,
        limit: i64,
        max_bytes: i64,
    ) -> Result<TaskPage, StorageError> {
        queries::list_tasks(&self.readers, agent_id, after_seq, limit, max_bytes).await
    }

    async fn cleanup_cutoff(&self, older_than: Duration) -> Result<DateTime<Utc>, StorageError> {
        queries::now_minus(&self.readers, older_than).await
    }

    /// A write of its own, so claims interleave with cleanup.
    #[tracing::instrument(skip_all)]
    async fn delete_keys_created_before(
        &self,
        scope: &str,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StorageError> {
        let scope = scope.to_owned();
        self.writer
            .run(move |connection| {
                Box::pin(async move {
                    queries::delete_keys_created_before(connection, &scope, cutoff, limit).await
                })
            })
            .await
    }

    async fn queue_stats(&self) -> Result<super::QueueStats, StorageError> {
        // The readers: the health checks keep their connection.
        queries::queue_stats(&self.readers).await
    }

    async fn recent_failures(&self, limit: i64) -> Result<Vec<TaskRecord>, StorageError> {
        queries::recent_failures(&self.readers, limit).await
    }

    fn connections(&self) -> (u32, u32) {
        super::pool_usage(self.readers.size(), self.readers.num_idle())
    }

    async fn ping(&self) -> Result<(), StorageError> {
        if self.writer.is_closed() {
            return Err(StorageError::Unavailable(sqlx::Error::WorkerCrashed));
        }
        if !self.writer.is_healthy() {
            // Only when the writer is known broken: ask it to reopen its
            // connection, so health recovers without waiting for traffic.
            self.writer
                .run(|connection| Box::pin(queries::ping(connection)))
                .await?;
        }
        queries::read_check(&self.health).await
    }

    fn events(&self) -> &TaskEvents {
        &self.events
    }

    #[tracing::instrument(skip_all)]
    async fn lease_tasks(&self, order: &LeaseOrder<'_>) -> Result<LeasedTasks, StorageError> {
        let order = LeaseRow::from(order);
        if !queries::any_leasable(&self.readers, &order).await? {
            return Ok(LeasedTasks::default());
        }
        let done = self.writer.lease(order).await?;
        for task_id in done.ended {
            self.events.task_finished(task_id);
        }
        if done.left_behind {
            // Tasks past the order's limits stay queued: pollers waiting
            // may take them now.
            self.events.task_ready();
        }
        Ok(done.granted)
    }

    #[tracing::instrument(skip_all)]
    async fn renew_lease(
        &self,
        lease: LeaseRef,
        lease_duration: Duration,
    ) -> Result<Option<TaskRecord>, StorageError> {
        self.writer
            .run(move |connection| {
                Box::pin(queries::renew_lease(connection, lease, lease_duration))
            })
            .await
    }

    #[tracing::instrument(skip_all)]
    async fn complete_task(
        &self,
        completion: &Completion,
    ) -> Result<Option<TaskRecord>, StorageError> {
        let task = self.writer.complete(completion.clone()).await?;
        self.announce(task.as_ref());
        Ok(task)
    }

    #[tracing::instrument(skip_all)]
    async fn fail_task(
        &self,
        failure: &Failure,
        outcome: &FailureOutcome,
    ) -> Result<Option<TaskRecord>, StorageError> {
        let (failure, outcome) = (failure.clone(), *outcome);
        let task = self
            .writer
            .run(move |connection| {
                Box::pin(async move { queries::fail_task(connection, &failure, &outcome).await })
            })
            .await?;
        self.announce(task.as_ref());
        Ok(task)
    }

    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StorageError> {
        queries::api_keys(&self.readers).await
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<bool, StorageError> {
        let row = queries::ApiKeyRow::from(key);
        self.writer
            .run(move |connection| {
                Box::pin(async move { queries::insert_api_key(connection, &row).await })
            })
            .await
    }

    async fn rotate_api_key(
        &self,
        name: &str,
        token_hash: &[u8; 32],
        grace: Duration,
    ) -> Result<Option<DateTime<Utc>>, StorageError> {
        let (name, token_hash, grace) = (name.to_owned(), token_hash.to_vec(), micros(grace));
        self.writer
            .run(move |connection| {
                Box::pin(async move {
                    queries::rotate_api_key(connection, &name, &token_hash, grace).await
                })
            })
            .await
    }

    async fn revoke_api_key(&self, name: &str) -> Result<bool, StorageError> {
        let name = name.to_owned();
        self.writer
            .run(move |connection| {
                Box::pin(async move { queries::revoke_api_key(connection, &name).await })
            })
            .await
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_task(&self, task_id: Uuid) -> Result<Option<TaskRecord>, StorageError> {
        let task = self
            .writer
            .run(move |connection| Box::pin(queries::cancel_task(connection, task_id)))
            .await?;
        self.announce(task.as_ref());
        Ok(task)
    }
}

impl SqliteStore {
    /// Wakes whoever waits on a task a write just changed: its waiters if
    /// it ended, the workers if it is queued again.
    fn announce(&self, task: Option<&TaskRecord>) {
        match task {
            Some(task) if task.is_finished() => self.events.task_finished(task.task_id),
            Some(_) => self.events.task_ready(),
            None => {}
        }
    }
}
