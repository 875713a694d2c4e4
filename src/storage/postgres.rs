//! The PostgreSQL store.

use std::{fmt, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{
    PgPool, Row,
    migrate::MigrateDatabase,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
    types::Json,
};
use uuid::Uuid;

use super::StorageError;
use crate::{config::redact_url, domain::NewTask, idempotency::Fingerprint};

/// How to reach the database and how to use it.
#[derive(Clone)]
pub struct DatabaseSettings {
    /// A `postgres://` URL; may hold a password, so never logged as is.
    pub url: String,
    /// The most connections the pool opens.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection (and for a new
    /// connection to open) before it fails as UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// How long a statement waits for a lock, in particular for a concurrent
    /// request holding the same idempotency key, before giving up.
    pub in_flight_wait: Duration,
    /// Create the database named in `url` when it does not exist yet.
    pub create_database: bool,
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("in_flight_wait", &self.in_flight_wait)
            .field("create_database", &self.create_database)
            .finish()
    }
}

/// The PostgreSQL-backed store: a connection pool and the statements.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    health_pool: PgPool,
}

/// A live idempotency record.
#[derive(Debug, Clone)]
pub struct StoredKey {
    /// The fingerprint of the request that claimed the key.
    pub fingerprint: Vec<u8>,
    /// The encoded response given to that request.
    pub response: Vec<u8>,
}

/// The result of looking a key up.
#[derive(Debug, Clone)]
pub struct KeyLookup {
    /// The key's record, if one exists and is younger than the retention.
    pub record: Option<StoredKey>,
    /// The database's clock at the time of the lookup.
    pub now: DateTime<Utc>,
}

/// Everything needed to claim a key and create its task in one go.
#[derive(Debug)]
pub struct NewKeyedTask<'a> {
    /// The key's scope: the RPC method.
    pub scope: &'a str,
    /// The client's key.
    pub key: &'a str,
    /// The request's fingerprint.
    pub fingerprint: &'a Fingerprint,
    /// The validated request.
    pub task: &'a NewTask,
    /// The new task's id.
    pub task_id: Uuid,
    /// The new task's status.
    pub status: i16,
    /// The new task's creation time.
    pub create_time: DateTime<Utc>,
    /// The encoded response to store for replays.
    pub response: &'a [u8],
    /// Records older than this count as absent and may be replaced.
    pub retention: Duration,
}

/// Whether a claim took the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key and the task were committed together.
    Claimed,
    /// A live record for the key already exists; nothing was written.
    AlreadyClaimed,
}

/// One row of `tasks`.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Creation order, used for paging.
    pub seq: i64,
    /// The task's id.
    pub task_id: Uuid,
    /// The owning agent.
    pub agent_id: String,
    /// The action.
    pub action: String,
    /// The parameters as a JSON object.
    pub parameters: serde_json::Value,
    /// The `TaskStatus` number.
    pub status: i16,
    /// The result, once something completed the task.
    pub result: Option<serde_json::Value>,
    /// When the task was created.
    pub create_time: DateTime<Utc>,
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
            .map_err(|e| StorageError::Internal(e.into()))?;
        migration_pool.close().await;

        let lock_timeout = format!("{}ms", settings.in_flight_wait.as_millis().max(1));
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(
                options
                    .clone()
                    .options([("lock_timeout", lock_timeout.as_str())])
                    .application_name("oncely"),
            );
        // Health has a connection of its own, so a pool busy with waiting
        // requests does not look like a dead database.
        let health_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options.application_name("oncely-health"));
        Ok(Self { pool, health_pool })
    }

    /// The connection pool, for health checks and tests.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Looks up a live key record with one indexed read, and reads the
    /// database clock in the same statement.
    #[tracing::instrument(skip_all)]
    pub async fn find_key(
        &self,
        scope: &str,
        key: &str,
        retention: Duration,
    ) -> Result<KeyLookup, StorageError> {
        let row = sqlx::query(
            "SELECT now() AS now, k.fingerprint, k.response \
             FROM (SELECT 1) AS one \
             LEFT JOIN idempotency_keys AS k \
               ON k.scope = $1 AND k.key = $2 AND k.created_at > now() - $3::interval",
        )
        .bind(scope)
        .bind(key)
        .bind(retention)
        .fetch_one(&self.pool)
        .await?;
        let fingerprint: Option<Vec<u8>> = row.try_get("fingerprint")?;
        let response: Option<Vec<u8>> = row.try_get("response")?;
        Ok(KeyLookup {
            record: fingerprint
                .zip(response)
                .map(|(fingerprint, response)| StoredKey {
                    fingerprint,
                    response,
                }),
            now: row.try_get("now")?,
        })
    }

    /// Claims the key and inserts its task in one statement, which PostgreSQL
    /// runs as one transaction: both rows commit or neither does, and no
    /// explicit BEGIN is needed (so a cancelled request cannot leave a pooled
    /// connection inside a transaction).
    ///
    /// A record older than the retention is replaced. A live record is left
    /// untouched. A concurrent uncommitted claim of the same key makes this
    /// statement wait for its outcome, at most `lock_timeout`.
    #[tracing::instrument(skip_all, fields(task_id = %new.task_id))]
    pub async fn claim_key_and_insert_task(
        &self,
        new: &NewKeyedTask<'_>,
    ) -> Result<ClaimOutcome, StorageError> {
        let inserted = sqlx::query(
            "WITH claim AS ( \
                 INSERT INTO idempotency_keys AS k (scope, key, fingerprint, task_id, response) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (scope, key) DO UPDATE \
                     SET fingerprint = EXCLUDED.fingerprint, task_id = EXCLUDED.task_id, \
                         response = EXCLUDED.response, created_at = now() \
                     WHERE k.created_at <= now() - $11::interval \
                 RETURNING task_id \
             ) \
             INSERT INTO tasks (task_id, agent_id, action, parameters, status, create_time) \
             SELECT task_id, $6, $7, $8::jsonb, $9, $10 FROM claim \
             RETURNING task_id",
        )
        .bind(new.scope)
        .bind(new.key)
        .bind(new.fingerprint.as_bytes())
        .bind(new.task_id)
        .bind(new.response)
        .bind(&new.task.agent_id)
        .bind(&new.task.action)
        .bind(&new.task.parameters_json)
        .bind(new.status)
        .bind(new.create_time)
        .bind(new.retention)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match inserted {
            Some(_) => ClaimOutcome::Claimed,
            None => ClaimOutcome::AlreadyClaimed,
        })
    }

    /// Reads one task.
    #[tracing::instrument(skip_all)]
    pub async fn get_task(&self, task_id: Uuid) -> Result<Option<TaskRow>, StorageError> {
        sqlx::query(
            "SELECT seq, task_id, agent_id, action, parameters, status, result, create_time \
             FROM tasks WHERE task_id = $1",
        )
        .bind(task_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| task_row(&row))
        .transpose()
    }

    /// Reads up to `limit` of an agent's tasks created after `after_seq`,
    /// oldest first.
    #[tracing::instrument(skip_all)]
    pub async fn list_tasks(
        &self,
        agent_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<TaskRow>, StorageError> {
        sqlx::query(
            "SELECT seq, task_id, agent_id, action, parameters, status, result, create_time \
             FROM tasks WHERE agent_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(agent_id)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(task_row)
        .collect()
    }

    /// Deletes idempotency records created more than `older_than` ago, in
    /// batches of `batch_size`, each its own short transaction, so a large
    /// table is never locked for long. Rows locked by others are skipped.
    /// Returns how many were deleted. Tasks are never deleted.
    #[tracing::instrument(skip_all, fields(deleted))]
    pub async fn delete_keys_older_than(
        &self,
        older_than: Duration,
        batch_size: i64,
    ) -> Result<u64, StorageError> {
        // One cutoff for the whole run, so it ends even under steady traffic.
        let cutoff: DateTime<Utc> = sqlx::query_scalar("SELECT now() - $1::interval")
            .bind(older_than)
            .fetch_one(&self.pool)
            .await?;
        let mut deleted = 0;
        loop {
            let batch = sqlx::query(
                "DELETE FROM idempotency_keys AS k USING ( \
                     SELECT scope, key FROM idempotency_keys \
                     WHERE created_at < $1 \
                     ORDER BY created_at \
                     LIMIT $2 \
                     FOR UPDATE SKIP LOCKED \
                 ) AS doomed \
                 WHERE k.scope = doomed.scope AND k.key = doomed.key",
            )
            .bind(cutoff)
            .bind(batch_size)
            .execute(&self.pool)
            .await?
            .rows_affected();
            deleted += batch;
            if batch < batch_size as u64 {
                break;
            }
        }
        tracing::Span::current().record("deleted", deleted);
        Ok(deleted)
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StorageError> {
        sqlx::query("SELECT 1").execute(&self.health_pool).await?;
        Ok(())
    }
}

fn task_row(row: &PgRow) -> Result<TaskRow, StorageError> {
    let Json(parameters) = row.try_get::<Json<serde_json::Value>, _>("parameters")?;
    let result = row
        .try_get::<Option<Json<serde_json::Value>>, _>("result")?
        .map(|Json(v)| v);
    Ok(TaskRow {
        seq: row.try_get("seq")?,
        task_id: row.try_get("task_id")?,
        agent_id: row.try_get("agent_id")?,
        action: row.try_get("action")?,
        parameters,
        status: row.try_get("status")?,
        result,
        create_time: row.try_get("create_time")?,
    })
}
