//! The PostgreSQL store.

use std::{str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{
    PgPool, Row,
    migrate::MigrateDatabase,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
    types::Json,
};
use uuid::Uuid;

use super::{
    ClaimOutcome, DatabaseSettings, KeyLookup, NewKeyedTask, StorageError, Store, StoredKey,
    TaskRow,
};
use crate::config::redact_url;

/// The PostgreSQL-backed store: a connection pool and the statements.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    health_pool: PgPool,
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
        Ok(Self {
            pool,
            health_pool,
            description: format!("postgres at {}", redact_url(&settings.url)),
        })
    }
}

impl Store for PgStore {
    fn describe(&self) -> String {
        self.description.clone()
    }

    /// Looks up a live key record with one indexed read, and reads the
    /// database clock in the same statement.
    #[tracing::instrument(skip_all)]
    async fn find_key(
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
    async fn claim_key_and_insert_task(
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
    async fn get_task(&self, task_id: Uuid) -> Result<Option<TaskRow>, StorageError> {
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
    async fn list_tasks(
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

    async fn cleanup_cutoff(&self, older_than: Duration) -> Result<DateTime<Utc>, StorageError> {
        Ok(sqlx::query_scalar("SELECT now() - $1::interval")
            .bind(older_than)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Rows locked by in-flight requests are skipped.
    #[tracing::instrument(skip_all)]
    async fn delete_keys_created_before(
        &self,
        scope: &str,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StorageError> {
        Ok(sqlx::query(
            "DELETE FROM idempotency_keys AS k USING ( \
                 SELECT scope, key FROM idempotency_keys \
                 WHERE scope = $3 AND created_at < $1 \
                 ORDER BY created_at \
                 LIMIT $2 \
                 FOR UPDATE SKIP LOCKED \
             ) AS doomed \
             WHERE k.scope = doomed.scope AND k.key = doomed.key",
        )
        .bind(cutoff)
        .bind(limit)
        .bind(scope)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn ping(&self) -> Result<(), StorageError> {
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
