//! The statements of API keys on SQLite.

use sqlx::{Row, SqliteConnection, SqliteExecutor};

use chrono::{DateTime, Utc};

use super::time;
use crate::{
    domain::{ApiKeyRecord, PreviousToken, Principal},
    storage::{StorageError, role, token_hash},
};

/// Every API key, revoked ones included, oldest first.
pub async fn api_keys(db: impl SqliteExecutor<'_>) -> Result<Vec<ApiKeyRecord>, StorageError> {
    let rows = sqlx::query(
        "SELECT name, token_hash, role, agent_ids, actions, created_at, revoked_at, \
                previous_token_hash, previous_until \
         FROM api_keys ORDER BY created_at, name",
    )
    .fetch_all(db)
    .await?;
    let list = |text: String| {
        serde_json::from_str::<Vec<String>>(&text)
            .map_err(|e| StorageError::Corrupt(format!("an api key's list: {e}")))
    };
    rows.iter()
        .map(|row| {
            Ok(ApiKeyRecord {
                principal: Principal {
                    name: row.try_get("name")?,
                    role: role(row.try_get("role")?)?,
                    agent_ids: list(row.try_get("agent_ids")?)?,
                    actions: list(row.try_get("actions")?)?,
                },
                token_hash: token_hash(row.try_get("token_hash")?)?,
                created_at: time(row.try_get("created_at")?)?,
                revoked_at: row
                    .try_get::<Option<i64>, _>("revoked_at")?
                    .map(time)
                    .transpose()?,
                previous: match (
                    row.try_get::<Option<Vec<u8>>, _>("previous_token_hash")?,
                    row.try_get::<Option<i64>, _>("previous_until")?,
                ) {
                    (Some(hash), Some(until)) => Some(PreviousToken {
                        token_hash: token_hash(hash)?,
                        until: time(until)?,
                    }),
                    _ => None,
                },
            })
        })
        .collect()
}

/// An owned API key record in the form SQLite stores it.
#[derive(Debug)]
pub struct ApiKeyRow {
    name: String,
    token_hash: Vec<u8>,
    role: &'static str,
    agent_ids: String,
    actions: String,
}

impl From<&ApiKeyRecord> for ApiKeyRow {
    fn from(key: &ApiKeyRecord) -> Self {
        let list = |items: &[String]| serde_json::Value::from(items.to_vec()).to_string();
        Self {
            name: key.principal.name.clone(),
            token_hash: key.token_hash.to_vec(),
            role: key.principal.role.as_str(),
            agent_ids: list(&key.principal.agent_ids),
            actions: list(&key.principal.actions),
        }
    }
}

/// Stores a new API key; `false` when the name is taken.
pub async fn insert_api_key(
    connection: &mut SqliteConnection,
    key: &ApiKeyRow,
) -> Result<bool, StorageError> {
    let inserted = sqlx::query(concat!(
        "INSERT INTO api_keys (name, token_hash, role, agent_ids, actions, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ",
        now!(),
        ") ON CONFLICT (name) DO NOTHING RETURNING name"
    ))
    .bind(&key.name)
    .bind(&key.token_hash)
    .bind(key.role)
    .bind(&key.agent_ids)
    .bind(&key.actions)
    .fetch_optional(connection)
    .await?;
    Ok(inserted.is_some())
}

/// Revokes a live key; `false` when there is none of that name.
pub async fn revoke_api_key(
    connection: &mut SqliteConnection,
    name: &str,
) -> Result<bool, StorageError> {
    Ok(sqlx::query(concat!(
        "UPDATE api_keys SET revoked_at = ",
        now!(),
        " WHERE name = ?1 AND revoked_at IS NULL"
    ))
    .bind(name)
    .execute(connection)
    .await?
    .rows_affected()
        == 1)
}

/// Gives a live key a new token hash, keeping its current one accepted for
/// `grace` microseconds; when that ends, or `None` when no live key has
/// that name.
pub async fn rotate_api_key(
    connection: &mut SqliteConnection,
    name: &str,
    token_hash: &[u8],
    grace: i64,
) -> Result<Option<DateTime<Utc>>, StorageError> {
    let until: Option<i64> = sqlx::query_scalar(concat!(
        "UPDATE api_keys SET \
             previous_token_hash = CASE WHEN ?3 > 0 THEN token_hash END, \
             previous_until = CASE WHEN ?3 > 0 THEN ",
        now!(),
        " + ?3 END, \
             token_hash = ?2 \
         WHERE name = ?1 AND revoked_at IS NULL \
         RETURNING ",
        now!(),
        " + ?3"
    ))
    .bind(name)
    .bind(token_hash)
    .bind(grace)
    .fetch_optional(connection)
    .await?;
    until.map(time).transpose()
}
