//! The statements of idempotency records on SQLite: looking a key up,
//! claiming keys with their tasks, and cleaning up old records.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection, SqliteExecutor, sqlite::SqliteRow};

use super::time;
use crate::storage::{Claimed, KeyClaim, KeyLookup, StorageError, StoredKey, micros};

/// A [`KeyClaim`] in the form SQLite stores it.
#[derive(Debug)]
pub struct ClaimRow {
    scope: &'static str,
    key: String,
    fingerprint: Vec<u8>,
    task_id: String,
    response: Vec<u8>,
    agent_id: String,
    action: String,
    parameters_json: String,
    /// The bytes of `parameters_json`.
    parameters_bytes: i64,
    create_time: i64,
    retention: i64,
}

impl From<KeyClaim> for ClaimRow {
    fn from(claim: KeyClaim) -> Self {
        Self {
            scope: claim.scope,
            key: claim.key,
            fingerprint: claim.fingerprint.to_vec(),
            task_id: claim.task_id.to_string(),
            response: claim.response,
            agent_id: claim.agent_id,
            action: claim.action,
            parameters_bytes: i64::try_from(claim.parameters_json.len()).unwrap_or(i64::MAX),
            parameters_json: claim.parameters_json,
            create_time: claim.create_time.timestamp_micros(),
            retention: micros(claim.retention),
        }
    }
}

impl ClaimRow {
    /// Records older than this (in microseconds) may be replaced.
    pub fn retention(&self) -> i64 {
        self.retention
    }
}

/// Looks up a live key record with one indexed read, and reads the database
/// clock in the same statement.
pub async fn find_key(
    db: impl SqliteExecutor<'_>,
    scope: &str,
    key: &str,
    retention: Duration,
) -> Result<KeyLookup, StorageError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        now!(),
        " AS now, k.fingerprint, k.response, k.created_at + ?3 - ",
        now!(),
        " AS remaining_us \
         FROM (SELECT 1) AS one \
         LEFT JOIN idempotency_keys AS k \
           ON k.scope = ?1 AND k.key = ?2 AND k.created_at > ",
        now!(),
        " - ?3"
    ))
    .bind(scope)
    .bind(key)
    .bind(micros(retention))
    .fetch_one(db)
    .await?;
    Ok(KeyLookup {
        record: stored_key(&row)?,
        now: time(row.try_get("now")?)?,
    })
}

/// The earliest live record among `keys` of `scope` whose task is for
/// `agent_id` (see [`crate::storage::Store::find_legacy_key`]).
pub async fn find_legacy_key(
    db: impl SqliteExecutor<'_>,
    scope: &str,
    keys: &[String],
    agent_id: &str,
    retention: Duration,
) -> Result<Option<StoredKey>, StorageError> {
    let row = sqlx::query(concat!(
        "SELECT k.fingerprint, k.response, k.created_at + ?4 - ",
        now!(),
        " AS remaining_us \
         FROM json_each(?2) AS wanted \
         JOIN idempotency_keys AS k ON k.scope = ?1 AND k.key = wanted.value \
         JOIN tasks AS t ON t.task_id = k.task_id \
         WHERE t.agent_id = ?3 AND k.created_at > ",
        now!(),
        " - ?4 \
         ORDER BY k.created_at LIMIT 1"
    ))
    .bind(scope)
    .bind(serde_json::Value::from(keys.to_vec()).to_string())
    .bind(agent_id)
    .bind(micros(retention))
    .fetch_optional(db)
    .await?;
    Ok(row.as_ref().map(stored_key).transpose()?.flatten())
}

/// Claims a batch of keys with retention `retention` (every row's), in
/// three statements whatever the batch's size, inside the caller's (write)
/// transaction: one claims the keys (replacing records older than the
/// retention, leaving live ones; rows run in order, so a key's second
/// claim finds its first), one inserts the tasks of the claims that took
/// their key, and the live records of the others are read. Answers in the
/// claims' order. On an error the caller undoes the transaction.
pub async fn claim_keys(
    connection: &mut SqliteConnection,
    claims: &[&ClaimRow],
    retention: i64,
) -> Result<Vec<Claimed>, StorageError> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let values = vec![concat!("(?, ?, ?, ?, ?, ", now!(), ")"); claims.len()].join(", ");
    let sql = format!(
        "INSERT INTO idempotency_keys AS k (scope, key, fingerprint, task_id, response, created_at) \
         VALUES {values} \
         ON CONFLICT (scope, key) DO UPDATE \
             SET fingerprint = excluded.fingerprint, task_id = excluded.task_id, \
                 response = excluded.response, created_at = excluded.created_at \
             WHERE k.created_at <= excluded.created_at - {retention} \
         RETURNING task_id"
    );
    let mut claim = sqlx::query(sqlx::AssertSqlSafe(sql));
    for row in claims {
        claim = claim
            .bind(row.scope)
            .bind(&row.key)
            .bind(&row.fingerprint)
            .bind(&row.task_id)
            .bind(&row.response);
    }
    let taken: std::collections::HashSet<String> = claim
        .fetch_all(&mut *connection)
        .await?
        .iter()
        .map(|row| row.try_get::<String, _>("task_id"))
        .collect::<Result<_, _>>()?;

    let created: Vec<&&ClaimRow> = claims
        .iter()
        .filter(|c| taken.contains(&c.task_id))
        .collect();
    if !created.is_empty() {
        let values = vec![
            concat!("(?, ?, ?, ?, ?, ", status!(queued), ", ?, ?, ", now!(), ")");
            created.len()
        ]
        .join(", ");
        let sql = format!(
            "INSERT INTO tasks \
                 (task_id, agent_id, action, parameters, parameters_bytes, status, create_time, \
                  update_time, available_at) \
             VALUES {values}"
        );
        let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql));
        for row in &created {
            insert = insert
                .bind(&row.task_id)
                .bind(&row.agent_id)
                .bind(&row.action)
                .bind(&row.parameters_json)
                .bind(row.parameters_bytes)
                .bind(row.create_time)
                .bind(row.create_time);
        }
        insert.execute(&mut *connection).await?;
    }

    let mut outcomes = Vec::with_capacity(claims.len());
    for row in claims {
        outcomes.push(if taken.contains(&row.task_id) {
            Claimed::Created
        } else {
            held(connection, row).await?
        });
    }
    Ok(outcomes)
}

/// The live record that holds `claim`'s key, read inside the transaction.
async fn held(
    connection: &mut SqliteConnection,
    claim: &ClaimRow,
) -> Result<Claimed, StorageError> {
    let row = sqlx::query(concat!(
        "SELECT fingerprint, response, created_at + ?3 - ",
        now!(),
        " AS remaining_us FROM idempotency_keys WHERE scope = ?1 AND key = ?2"
    ))
    .bind(claim.scope)
    .bind(&claim.key)
    .bind(claim.retention)
    .fetch_optional(&mut *connection)
    .await?;
    Ok(match row.as_ref().map(stored_key).transpose()?.flatten() {
        Some(stored) => Claimed::Held(stored),
        None => Claimed::Unseen,
    })
}

/// The claim's statements, inside the caller's (write) transaction: claim
/// the key (replacing a record older than the retention, leaving a live
/// one) and insert the task if the key was taken; otherwise read the live
/// record, which the transaction sees.
pub async fn claim_key(
    connection: &mut SqliteConnection,
    claim: &ClaimRow,
) -> Result<Claimed, StorageError> {
    let claimed = sqlx::query(concat!(
        "INSERT INTO idempotency_keys AS k (scope, key, fingerprint, task_id, response, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ",
        now!(),
        ") \
         ON CONFLICT (scope, key) DO UPDATE \
             SET fingerprint = excluded.fingerprint, task_id = excluded.task_id, \
                 response = excluded.response, created_at = excluded.created_at \
             WHERE k.created_at <= excluded.created_at - ?6 \
         RETURNING task_id"
    ))
    .bind(claim.scope)
    .bind(&claim.key)
    .bind(&claim.fingerprint)
    .bind(&claim.task_id)
    .bind(&claim.response)
    .bind(claim.retention)
    .fetch_optional(&mut *connection)
    .await?;
    if claimed.is_none() {
        return held(connection, claim).await;
    }
    sqlx::query(concat!(
        "INSERT INTO tasks \
             (task_id, agent_id, action, parameters, parameters_bytes, status, create_time, \
              update_time, available_at) \
         VALUES (?1, ?2, ?3, ?4, ?6, ",
        status!(queued),
        ", ?5, ?5, ",
        now!(),
        ")"
    ))
    .bind(&claim.task_id)
    .bind(&claim.agent_id)
    .bind(&claim.action)
    .bind(&claim.parameters_json)
    .bind(claim.create_time)
    .bind(claim.parameters_bytes)
    .execute(&mut *connection)
    .await?;
    Ok(Claimed::Created)
}

/// When a record of the earlier, per-API-key scope was last written, at
/// the latest.
pub async fn legacy_key_records_at(
    db: impl SqliteExecutor<'_>,
) -> Result<Option<DateTime<Utc>>, StorageError> {
    let at: Option<i64> =
        sqlx::query_scalar("SELECT at FROM upgrade_marks WHERE name = 'legacy_key_records'")
            .fetch_optional(db)
            .await?;
    at.map(time).transpose()
}

/// Notes that records of the earlier scope are written now.
pub async fn mark_legacy_key_records(
    connection: &mut SqliteConnection,
) -> Result<(), StorageError> {
    sqlx::query(concat!(
        "INSERT INTO upgrade_marks AS m (name, at) VALUES ('legacy_key_records', ",
        now!(),
        ") ON CONFLICT (name) DO UPDATE SET at = max(m.at, excluded.at)"
    ))
    .execute(connection)
    .await?;
    Ok(())
}

/// The live record a row shows, if any: `fingerprint`, `response` and
/// `remaining_us`.
fn stored_key(row: &SqliteRow) -> Result<Option<StoredKey>, StorageError> {
    Ok(StoredKey::from_columns(
        row.try_get("fingerprint")?,
        row.try_get("response")?,
        row.try_get("remaining_us")?,
    ))
}

/// The database clock minus `duration`.
pub async fn now_minus(
    db: impl SqliteExecutor<'_>,
    duration: Duration,
) -> Result<DateTime<Utc>, StorageError> {
    let cutoff: i64 = sqlx::query_scalar(concat!("SELECT ", now!(), " - ?1"))
        .bind(micros(duration))
        .fetch_one(db)
        .await?;
    time(cutoff)
}

/// Deletes at most `limit` records of `scope` created before `cutoff`,
/// oldest first.
pub async fn delete_keys_created_before(
    connection: &mut SqliteConnection,
    scope: &str,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys WHERE rowid IN ( \
             SELECT rowid FROM idempotency_keys \
             WHERE scope = ?3 AND created_at < ?1 \
             ORDER BY created_at LIMIT ?2)",
    )
    .bind(cutoff.timestamp_micros())
    .bind(limit)
    .bind(scope)
    .execute(connection)
    .await?
    .rows_affected())
}
