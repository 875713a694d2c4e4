//! The storage layer: every SQL statement oncely runs lives here, behind the
//! [`Store`] trait, with one implementation per backend: [`PgStore`]
//! (PostgreSQL, for production and several instances) and [`SqliteStore`]
//! (an embedded file, the zero-setup default for one process). Each backend
//! keeps its statements in a `queries` module of their own, apart from the
//! machinery that runs them.
//!
//! Query style: runtime-checked `sqlx::query` with binds, so building needs no
//! database; the integration tests exercise every statement on both backends.
//!
//! - `store.rs`: the [`Store`] trait.
//! - `idempotency_records.rs`, `queue_types.rs`: what the stores take and
//!   give; `task_row.rs`: a task row's columns and stored status, with
//!   their SQL text.
//! - `postgres/`, `sqlite/`: the two backends.
//! - `grouping.rs`: how both split a batch into statements.
//! - `error.rs`: [`StorageError`] and the database error codes it reads.
//! - `events.rs`: the wake-ups a store raises; `settings.rs`: how to reach
//!   the database; `history.rs`: whether the database's history changed
//!   under this instance (a failover, a restore).

#[macro_use]
mod task_row;
mod error;
mod events;
mod grouping;
mod history;
mod idempotency_records;
pub mod postgres;
mod queue_types;
mod settings;
pub mod sqlite;
mod store;

use std::time::Duration;

use uuid::Uuid;

pub use error::StorageError;
pub use events::TaskEvents;
pub use history::{DatabaseHistory, Identity};
pub use idempotency_records::{Claimed, KeyClaim, KeyLookup, StoredKey};
pub use postgres::PgStore;
pub use queue_types::{
    FailureOutcome, GroupCommits, LeaseOrder, LeasedTasks, QueueStats, TaskPage,
};
pub use settings::{Backend, DatabaseSettings, redact_url};
pub use sqlite::SqliteStore;
pub use store::Store;

/// A duration in whole microseconds, saturating: how both stores take
/// durations in their statements.
pub fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// A pool's connections as [`Store::connections`] reports them: in use,
/// idle.
fn pool_usage(size: u32, idle: usize) -> (u32, u32) {
    let idle = u32::try_from(idle).unwrap_or(u32::MAX);
    (size.saturating_sub(idle), idle)
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
