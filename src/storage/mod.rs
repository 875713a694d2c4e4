//! The storage layer: every SQL statement oncely runs lives here.
//!
//! Query style: runtime-checked `sqlx::query` with binds, so building needs no
//! database; the integration tests exercise every statement against a real
//! PostgreSQL.

mod error;
mod postgres;

pub use error::StorageError;
pub use postgres::{
    ClaimOutcome, DatabaseSettings, KeyLookup, NewKeyedTask, PgStore, StoredKey, TaskRow,
};
