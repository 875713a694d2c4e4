//! Storage errors, classified by SQLSTATE rather than by message text.

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A statement waited longer than the lock timeout, which for a claim
    /// means another request with the same key is still in flight.
    #[error("timed out waiting for a lock held by a concurrent request")]
    LockTimeout(#[source] sqlx::Error),
    /// The database cannot be reached or refused the work for now; retrying
    /// later may succeed.
    #[error("the database is unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// Anything else: a bug or corrupt data, not worth retrying.
    #[error("database error")]
    Internal(#[source] sqlx::Error),
    /// The single SQLite writer did not get to a write within the wait bound.
    #[error("the database writer was busy for {0:?}")]
    WriterBusy(std::time::Duration),
    /// The configuration names a store that cannot be used.
    #[error("{0}")]
    Config(String),
    /// A stored value could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// PostgreSQL's `lock_not_available`, raised when `lock_timeout` expires.
const LOCK_NOT_AVAILABLE: &str = "55P03";

impl From<sqlx::Error> for StorageError {
    fn from(error: sqlx::Error) -> Self {
        let class = match &error {
            sqlx::Error::Database(db) => {
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    sqlite_class(db.code().as_deref())
                } else {
                    postgres_class(db.code().as_deref())
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Class::Unavailable,
            _ => Class::Internal,
        };
        match class {
            Class::LockTimeout => Self::LockTimeout(error),
            Class::Unavailable => Self::Unavailable(error),
            Class::Internal => Self::Internal(error),
        }
    }
}

enum Class {
    LockTimeout,
    Unavailable,
    Internal,
}

/// Classifies a PostgreSQL SQLSTATE.
fn postgres_class(code: Option<&str>) -> Class {
    match code {
        Some(LOCK_NOT_AVAILABLE) => Class::LockTimeout,
        // 08: connection exception; 40: serialization failure or deadlock;
        // 53: insufficient resources; 57: operator intervention (shutdown,
        // cancel); 58: system error.
        Some(code)
            if ["08", "40", "53", "57", "58"]
                .iter()
                .any(|c| code.starts_with(c)) =>
        {
            Class::Unavailable
        }
        _ => Class::Internal,
    }
}

/// Classifies an SQLite (extended) result code by its primary code.
fn sqlite_class(code: Option<&str>) -> Class {
    match code.and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff) {
        // SQLITE_BUSY, SQLITE_LOCKED: another writer held the database for the
        // whole busy timeout.
        Some(5 | 6) => Class::LockTimeout,
        // SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_READONLY,
        // SQLITE_PROTOCOL: the file or disk is failing, maybe for a while.
        Some(8 | 10 | 13 | 14 | 15) => Class::Unavailable,
        _ => Class::Internal,
    }
}
