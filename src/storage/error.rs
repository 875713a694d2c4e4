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
    /// A stored value could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// PostgreSQL's `lock_not_available`, raised when `lock_timeout` expires.
const LOCK_NOT_AVAILABLE: &str = "55P03";

impl From<sqlx::Error> for StorageError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some(LOCK_NOT_AVAILABLE) => Self::LockTimeout(error),
                // 08: connection exception; 40: serialization failure or
                // deadlock; 53: insufficient resources; 57: operator
                // intervention (shutdown, cancel); 58: system error.
                Some(code)
                    if ["08", "40", "53", "57", "58"].contains(&&code[..2.min(code.len())]) =>
                {
                    Self::Unavailable(error)
                }
                _ => Self::Internal(error),
            },
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Self::Unavailable(error),
            _ => Self::Internal(error),
        }
    }
}
