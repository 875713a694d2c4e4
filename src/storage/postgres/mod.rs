//! The PostgreSQL store: connecting, migrating, the pools, and the listener
//! that turns other instances' notifications into wake-ups. The statements
//! are in [`queries`].

mod batch;
mod listener;
mod notify;
pub mod queries;

use std::{str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{
    PgPool,
    migrate::MigrateDatabase,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

use super::{
    Claimed, DatabaseHistory, DatabaseSettings, FailureOutcome, GroupCommits, KeyClaim, KeyLookup,
    LeaseOrder, LeasedTasks, StorageError, Store, StoredKey, TaskEvents, TaskPage, redact_url,
};
use crate::domain::{ApiKeyRecord, Completion, Failure, LeaseRef, TaskRecord};

/// The PostgreSQL-backed store: a connection pool and the statements.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Sends concurrent claims together.
    claims: batch::Batcher<batch::Claims>,
    /// Sends concurrent completions together.
    completions: batch::Batcher<batch::Completions>,
    /// Sends concurrent leases together.
    leases: batch::Batcher<batch::Leases>,
    /// The batchers' batch sizes, until the metrics take them.
    tally: batch::Tally,
    /// A connection of its own for health checks, so a pool busy with
    /// waiting requests does not look like a dead database.
    health_pool: PgPool,
    /// Wakes the waiters of the changes this instance commits, here and,
    /// through the database, on the other instances.
    wakeups: batch::PoolWithWakeups,
    /// Whether the database's history changed under this instance, as
    /// every new connection reports it.
    history: DatabaseHistory,
    /// Stops the listener when the last clone of the store is dropped.
    _listener: Arc<listener::Listening>,
    description: String,
}

impl PgStore {
    /// Connects, creating the database if asked and it is missing, and applies
    /// the migrations. Safe when several instances start at once: sqlx holds
    /// an advisory lock while migrating.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StorageError> {
        let options = PgConnectOptions::from_str(&settings.url).map_err(StorageError::Internal)?;
        if settings.create_database && !sqlx::Postgres::database_exists(&settings.url).await? {
            match sqlx::Postgres::create_database(&settings.url).await {
                Ok(()) => tracing::info!(url = %redact_url(&settings.url), "created the database"),
                // Another instance created it at the same moment (PostgreSQL
                // reports that as 42P04 or as a unique violation).
                Err(e) if sqlx::Postgres::database_exists(&settings.url).await? => {
                    tracing::debug!(error = %e, "another instance created the database");
                }
                Err(e) => return Err(e.into()),
            }
        }

        // Migrations run on their own connection without the lock timeout, so
        // an instance waiting for another's migration does not give up.
        let migration_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&migration_pool)
            .await
            .map_err(StorageError::from_migration)?;
        migration_pool.close().await;

        // lock_timeout bounds how long a claim waits for a concurrent
        // request holding the same key.
        let lock_timeout = format!("{}ms", settings.in_flight_wait.as_millis().max(1));
        // statement_timeout bounds every statement, so no request holds a
        // connection for long whatever the database is doing.
        let statement_timeout = format!("{}ms", settings.statement_timeout.as_millis().max(1));
        // Every statement is prepared once per connection and planned once:
        // left to choose, PostgreSQL re-plans a statement whose generic
        // plan looks dearer than a custom one (the lease's `LIMIT $3` does)
        // on every execution, which was a sixth of its CPU under load. The
        // generic plans reach rows through their indexes whatever the
        // tables held when they were made (tests/api/plans.rs).
        // Every connection, the listener's too when it reconnects, reports
        // where the database's history stands (a failover, a restore).
        let history = DatabaseHistory::tracked();
        let pool = observing(PgPoolOptions::new(), &history)
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(
                options
                    .clone()
                    .options([
                        ("lock_timeout", lock_timeout.as_str()),
                        ("statement_timeout", statement_timeout.as_str()),
                        ("plan_cache_mode", "force_generic_plan"),
                    ])
                    .application_name("oncely"),
            );
        let health_pool = observing(PgPoolOptions::new(), &history)
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options.clone().application_name("oncely-health"));
        // The listener holds a connection for good: one of its own, so the
        // requests keep the whole pool.
        let listener_pool = observing(PgPoolOptions::new(), &history)
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options.application_name("oncely-listener"));
        let events = TaskEvents::default();
        let listener = listener::start(listener_pool, events.clone());
        let notifier = notify::Notifier::start(pool.clone());
        let target = batch::PoolWithWakeups {
            pool: pool.clone(),
            notifier: notifier.clone(),
            events: events.clone(),
        };
        let tally = batch::Tally::default();
        Ok(Self {
            claims: batch::Batcher::start(batch::Claims(target.clone()), tally.clone()),
            completions: batch::Batcher::start(batch::Completions(target.clone()), tally.clone()),
            leases: batch::Batcher::start(batch::Leases::new(target.clone()), tally.clone()),
            wakeups: target,
            tally,
            pool,
            health_pool,
            history,
            _listener: Arc::new(listener),
            description: format!("postgres at {}", redact_url(&settings.url)),
        })
    }
}

/// `options` with every new connection reporting the database's identity
/// to `history`. A connection that cannot tell (an error) is used anyway:
/// it changes nothing, and leaves an untrusted history untrusted.
fn observing(options: PgPoolOptions, history: &DatabaseHistory) -> PgPoolOptions {
    let history = history.clone();
    options.after_connect(move |conn, _| {
        let history = history.clone();
        Box::pin(async move {
            if let Err(error) = read_history(&mut *conn, &history).await {
                tracing::debug!(%error, "cannot read where the database's history stands");
            }
            Ok(())
        })
    })
}

/// Reads where the database's history stands on `db` and reports it to
/// `history`; a change is counted and logged, once.
async fn read_history(
    db: impl sqlx::PgExecutor<'_>,
    history: &DatabaseHistory,
) -> Result<(), StorageError> {
    let identity = queries::identity(db).await?;
    if let Some(change) = history.observe(identity) {
        crate::metrics::metrics().history_changes.inc();
        tracing::warn!(
            %change,
            "the database's history changed (a failover or a restore): what this instance remembered of it is dropped, and answers come from the database"
        );
    }
    Ok(())
}

impl Store for PgStore {
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
        queries::find_key(&self.pool, scope, key, retention).await
    }

    #[tracing::instrument(skip_all, fields(task_id = %claim.task_id))]
    async fn claim_key(&self, claim: KeyClaim) -> Result<Claimed, StorageError> {
        self.claims.submit(claim).await
    }

    #[tracing::instrument(skip_all)]
    async fn find_legacy_key(
        &self,
        scope: &str,
        keys: &[String],
        agent_id: &str,
        retention: Duration,
    ) -> Result<Option<StoredKey>, StorageError> {
        queries::find_legacy_key(&self.pool, scope, keys, agent_id, retention).await
    }

    async fn legacy_key_records_at(&self) -> Result<Option<DateTime<Utc>>, StorageError> {
        queries::legacy_key_records_at(&self.pool).await
    }

    async fn mark_legacy_key_records(&self) -> Result<(), StorageError> {
        queries::mark_legacy_key_records(&self.pool).await
    }

    #[tracing::instrument(skip_all)]
    async fn get_task(&self, task_id: Uuid) -> Result<Option<TaskRecord>, StorageError> {
        queries::get_task(&self.pool, task_id).await
    }

    #[tracing::instrument(skip_all)]
    async fn list_tasks(
        &self,
        agent_id: &str,
        after_seq: i64,
        limit: i64,
        max_bytes: i64,
    ) -> Result<TaskPage, StorageError> {
        queries::list_settled_tasks(&self.pool, agent_id, after_seq, limit, max_bytes).await
    }

    async fn cleanup_cutoff(&self, older_than: Duration) -> Result<DateTime<Utc>, StorageError> {
        queries::now_minus(&self.pool, older_than).await
    }

    #[tracing::instrument(skip_all)]
    async fn delete_keys_created_before(
        &self,
        scope: &str,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StorageError> {
        queries::delete_keys_created_before(&self.pool, scope, cutoff, limit).await
    }

    async fn ping(&self) -> Result<(), StorageError> {
        queries::ping(&self.health_pool).await
    }

    fn history(&self) -> DatabaseHistory {
        self.history.clone()
    }

    async fn check_history(&self) -> Result<(), StorageError> {
        read_history(&self.health_pool, &self.history).await
    }

    async fn queue_stats(&self) -> Result<super::QueueStats, StorageError> {
        // The request pool: its statement_timeout bounds the count, and the
        // health checks keep their connection.
        queries::queue_stats(&self.pool).await
    }

    async fn recent_failures(&self, limit: i64) -> Result<Vec<TaskRecord>, StorageError> {
        queries::recent_failures(&self.pool, limit).await
    }

    fn connections(&self) -> (u32, u32) {
        super::pool_usage(self.pool.size(), self.pool.num_idle())
    }

    fn take_group_commits(&self) -> Vec<GroupCommits> {
        self.tally.take()
    }

    fn events(&self) -> &TaskEvents {
        &self.wakeups.events
    }

    #[tracing::instrument(skip_all)]
    async fn lease_tasks(&self, order: &LeaseOrder<'_>) -> Result<LeasedTasks, StorageError> {
        // Sent with the polls that arrive with it, in one statement (or a
        // few, when another statement took its picks first).
        self.leases.submit(batch::LeaseRequest::new(order)).await
    }

    #[tracing::instrument(skip_all)]
    async fn renew_lease(
        &self,
        lease: LeaseRef,
        lease_duration: Duration,
    ) -> Result<Option<TaskRecord>, StorageError> {
        queries::renew_lease(&self.pool, lease, lease_duration).await
    }

    #[tracing::instrument(skip_all)]
    async fn complete_task(
        &self,
        completion: &Completion,
    ) -> Result<Option<TaskRecord>, StorageError> {
        // Sent with the completions that arrive with it, in one statement;
        // the batcher wakes the task's waiters.
        self.completions.submit(completion.clone()).await
    }

    #[tracing::instrument(skip_all)]
    async fn fail_task(
        &self,
        failure: &Failure,
        outcome: &FailureOutcome,
    ) -> Result<Option<TaskRecord>, StorageError> {
        let (pool, failure, outcome) = (self.pool.clone(), failure.clone(), *outcome);
        self.write_and_announce(async move { queries::fail_task(&pool, &failure, &outcome).await })
            .await
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_task(&self, task_id: Uuid) -> Result<Option<TaskRecord>, StorageError> {
        let pool = self.pool.clone();
        self.write_and_announce(async move { queries::cancel_task(&pool, task_id).await })
            .await
    }

    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StorageError> {
        queries::api_keys(&self.pool).await
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<bool, StorageError> {
        queries::insert_api_key(&self.pool, key).await
    }

    async fn rotate_api_key(
        &self,
        name: &str,
        token_hash: &[u8; 32],
        grace: Duration,
    ) -> Result<Option<DateTime<Utc>>, StorageError> {
        queries::rotate_api_key(&self.pool, name, token_hash, grace).await
    }

    async fn revoke_api_key(&self, name: &str) -> Result<bool, StorageError> {
        queries::revoke_api_key(&self.pool, name).await
    }
}

impl PgStore {
    /// Runs `write` and announces the task it changed, in a task of its
    /// own: a caller that gives up (a cancelled call, a timeout) cannot
    /// drop the announcement of a change that committed. (A change whose
    /// answer the database lost is announced by no one; the waiters' slow
    /// re-check finds it.)
    async fn write_and_announce<W>(&self, write: W) -> Result<Option<TaskRecord>, StorageError>
    where
        W: Future<Output = Result<Option<TaskRecord>, StorageError>> + Send + 'static,
    {
        let store = self.clone();
        let written = tokio::spawn(async move {
            let task = write.await?;
            store.announce(task.as_ref()).await;
            Ok(task)
        });
        match written.await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Aborted only when the runtime shuts down.
            Err(_) => Err(StorageError::Unavailable(sqlx::Error::PoolClosed)),
        }
    }

    /// Wakes whoever waits on a task a committed write just changed, here
    /// and on every instance: its waiters if it ended, the workers if it is
    /// queued again.
    async fn announce(&self, task: Option<&TaskRecord>) {
        match task {
            Some(task) if task.is_finished() => self.wakeups.task_finished(task.task_id).await,
            Some(_) => self.wakeups.task_ready().await,
            None => {}
        }
    }
}
