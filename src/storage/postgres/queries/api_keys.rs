//! The statements of API keys on PostgreSQL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Row, types::Json};

use crate::{
    domain::{ApiKeyRecord, PreviousToken, Principal},
    storage::{StorageError, micros, role, token_hash},
};

/// Every API key, revoked ones included, oldest first.
pub async fn api_keys(db: impl PgExecutor<'_>) -> Result<Vec<ApiKeyRecord>, StorageError> {
    let rows = sqlx::query(
        "SELECT name, token_hash, role, agent_ids, actions, created_at, revoked_at, \
                previous_token_hash, previous_until \
         FROM api_keys ORDER BY created_at, name",
    )
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|row| {
            let Json(agent_ids) = row.try_get::<Json<Vec<String>>, _>("agent_ids")?;
            let Json(actions) = row.try_get::<Json<Vec<String>>, _>("actions")?;
            Ok(ApiKeyRecord {
                principal: Principal {
                    name: row.try_get("name")?,
                    role: role(row.try_get("role")?)?,
                    agent_ids,
                    actions,
                },
                token_hash: token_hash(row.try_get("token_hash")?)?,
                created_at: row.try_get("created_at")?,
                revoked_at: row.try_get("revoked_at")?,
                previous: match (
                    row.try_get::<Option<Vec<u8>>, _>("previous_token_hash")?,
                    row.try_get("previous_until")?,
                ) {
                    (Some(hash), Some(until)) => Some(PreviousToken {
                        token_hash: token_hash(hash)?,
                        until,
                    }),
                    _ => None,
                },
            })
        })
        .collect()
}

/// Stores a new API key; `false` when the name is taken.
pub async fn insert_api_key(
    db: impl PgExecutor<'_>,
    key: &ApiKeyRecord,
) -> Result<bool, StorageError> {
    let inserted = sqlx::query(
        "INSERT INTO api_keys (name, token_hash, role, agent_ids, actions) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING RETURNING name",
    )
    .bind(&key.principal.name)
    .bind(key.token_hash.as_slice())
    .bind(key.principal.role.as_str())
    .bind(Json(&key.principal.agent_ids))
    .bind(Json(&key.principal.actions))
    .fetch_optional(db)
    .await?;
    Ok(inserted.is_some())
}

/// Revokes a live key; `false` when there is none of that name.
pub async fn revoke_api_key(db: impl PgExecutor<'_>, name: &str) -> Result<bool, StorageError> {
    Ok(
        sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
        )
        .bind(name)
        .execute(db)
        .await?
        .rows_affected()
            == 1,
    )
}

/// Gives a live key a new token hash, keeping its current one accepted for
/// `grace`; when that ends, or `None` when no live key has that name.
pub async fn rotate_api_key(
    db: impl PgExecutor<'_>,
    name: &str,
    token_hash: &[u8; 32],
    grace: Duration,
) -> Result<Option<DateTime<Utc>>, StorageError> {
    Ok(sqlx::query_scalar(
        "UPDATE api_keys SET \
             previous_token_hash = CASE WHEN $3 > 0 THEN token_hash END, \
             previous_until = CASE WHEN $3 > 0 THEN now() + interval '1 microsecond' * $3 END, \
             token_hash = $2 \
         WHERE name = $1 AND revoked_at IS NULL \
         RETURNING now() + interval '1 microsecond' * $3",
    )
    .bind(name)
    .bind(token_hash.as_slice())
    .bind(micros(grace))
    .fetch_optional(db)
    .await?)
}
