//! Storage errors, classified by SQLSTATE rather than by message text.

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A statement waited longer than the lock timeout for a key record
    /// another transaction holds: for a claim, another request with the
    /// same key is still in flight. (On SQLite, whose locks cover the whole
    /// file, any write lock held elsewhere.)
    #[error("timed out waiting for a lock held by a concurrent request")]
    LockTimeout(#[source] sqlx::Error),
    /// A statement waited longer than the lock timeout for anything else
    /// (a table lock, as DDL takes): the database is busy, not the key.
    #[error("timed out waiting for a lock the database held")]
    LockWait(#[source] sqlx::Error),
    /// The database cannot be reached or refused the work for now; retrying
    /// later may succeed.
    #[error("the database is unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// Anything else: a bug or corrupt data, not worth retrying.
    #[error("database error")]
    Internal(#[source] sqlx::Error),
    /// The single SQLite writer did not get to a write within the wait
    /// bound: it was busy with other work.
    #[error("the database writer was busy for {0:?}")]
    WriterBusy(std::time::Duration),
    /// The single SQLite writer did not get to a write within the wait
    /// bound because another connection held the file's write lock: it may
    /// hold a request with the same key (SQLite's lock covers the file, so
    /// the store cannot tell).
    #[error("another connection held the database's write lock for {0:?}")]
    WriteLocked(std::time::Duration),
    /// The database answers but takes no writes now (it is read-only).
    #[error("the database takes no writes (it is read-only)")]
    ReadOnly,
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
                    sqlite_class(sqlite_primary_code(db.as_ref()))
                } else {
                    let context = db
                        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .and_then(|e| e.r#where());
                    postgres_class(db.code().as_deref(), context)
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
            Class::LockWait => Self::LockWait(error),
            Class::Unavailable => Self::Unavailable(error),
            Class::Internal => Self::Internal(error),
        }
    }
}

impl StorageError {
    /// Whether trying again later may succeed: everything but a bug,
    /// corrupt data or a wrong setting.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            StorageError::Internal(_) | StorageError::Corrupt(_) | StorageError::Config(_)
        )
    }

    /// A migration's failure: a statement that failed (maybe for want of a
    /// connection, or on a locked file) is classified like any other;
    /// anything else (a missing or changed migration) is a bug.
    pub fn from_migration(error: sqlx::migrate::MigrateError) -> Self {
        match error {
            sqlx::migrate::MigrateError::Execute(e)
            | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => Self::from(e),
            e => Self::Internal(e.into()),
        }
    }

    /// Whether the error says the store is set up wrong rather than not
    /// up yet, so that waiting for it is pointless: a TLS failure, or an
    /// SQLite file that is read-only or cannot be opened.
    pub fn is_misconfigured(&self) -> bool {
        let source = match self {
            StorageError::Unavailable(source) | StorageError::Internal(source) => source,
            _ => return false,
        };
        match source {
            sqlx::Error::Tls(_) => true,
            sqlx::Error::Database(db) => matches!(
                sqlite_primary_code(db.as_ref()),
                Some(SQLITE_READONLY | SQLITE_CANTOPEN)
            ),
            _ => false,
        }
    }
}

/// SQLITE_ERROR: a generic error (also "no transaction is active").
pub(crate) const SQLITE_ERROR: i32 = 1;
/// SQLITE_BUSY: another connection held the lock for the busy timeout.
pub(crate) const SQLITE_BUSY: i32 = 5;
/// SQLITE_LOCKED: a conflict within one connection's shared cache.
pub(crate) const SQLITE_LOCKED: i32 = 6;
/// SQLITE_READONLY: the file cannot be written.
pub(crate) const SQLITE_READONLY: i32 = 8;
/// SQLITE_IOERR: the operating system reported an I/O error.
pub(crate) const SQLITE_IOERR: i32 = 10;
/// SQLITE_FULL: the disk is full.
pub(crate) const SQLITE_FULL: i32 = 13;
/// SQLITE_CANTOPEN: the file cannot be opened.
pub(crate) const SQLITE_CANTOPEN: i32 = 14;
/// SQLITE_PROTOCOL: a locking protocol error.
pub(crate) const SQLITE_PROTOCOL: i32 = 15;

/// The primary result code of an SQLite error (an extended code's low
/// byte: SQLITE_READONLY_DBMOVED is SQLITE_READONLY); `None` for another
/// database's error. The one place SQLite's code is parsed.
pub(crate) fn sqlite_primary_code(error: &dyn sqlx::error::DatabaseError) -> Option<i32> {
    error.try_downcast_ref::<sqlx::sqlite::SqliteError>()?;
    error
        .code()
        .and_then(|code| code.parse::<i32>().ok())
        .map(|code| code & 0xff)
}

/// [`sqlite_primary_code`] of any error: `None` unless SQLite answered it.
pub(crate) fn sqlite_code_of(error: &sqlx::Error) -> Option<i32> {
    error.as_database_error().and_then(sqlite_primary_code)
}

#[derive(Debug, PartialEq, Eq)]
enum Class {
    LockTimeout,
    LockWait,
    Unavailable,
    Internal,
}

/// PostgreSQL's `object_not_in_prerequisite_state`: a broad class, seen
/// (as the issue that asked for this reported) while a server is not
/// accepting connections; answered as worth a retry.
const NOT_IN_PREREQUISITE_STATE: &str = "55000";
/// PostgreSQL's `read_only_sql_transaction`: a write sent to a standby, as
/// after a failover until the pool reaches the new primary.
const READ_ONLY_TRANSACTION: &str = "25006";

/// Classifies a PostgreSQL SQLSTATE; `context` is the error's CONTEXT line.
fn postgres_class(code: Option<&str>, context: Option<&str>) -> Class {
    match code {
        // A wait on a key record's row (the CONTEXT names a tuple of
        // idempotency_keys, in whatever language the server speaks) is a
        // wait for the request holding that key; any other (a table lock,
        // the numbering lock) is not.
        Some(LOCK_NOT_AVAILABLE) if context.is_some_and(names_key_records) => Class::LockTimeout,
        Some(LOCK_NOT_AVAILABLE) => Class::LockWait,
        Some(NOT_IN_PREREQUISITE_STATE | READ_ONLY_TRANSACTION) => Class::Unavailable,
        // 08: connection exception; 40: serialization failure or deadlock;
        // 53: insufficient resources; 57: operator intervention (shutdown,
        // cancel, cannot connect now); 58: system error.
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

/// Whether an error's CONTEXT names the relation `idempotency_keys` (not a
/// longer name that starts with it), however the server quotes it.
fn names_key_records(context: &str) -> bool {
    const NAME: &str = "idempotency_keys";
    context.match_indices(NAME).any(|(at, _)| {
        let next = context[at + NAME.len()..].chars().next();
        !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

/// Classifies an SQLite primary result code.
fn sqlite_class(code: Option<i32>) -> Class {
    match code {
        // Another writer held the database for the whole busy timeout.
        Some(SQLITE_BUSY | SQLITE_LOCKED) => Class::LockTimeout,
        // The file or disk is failing, maybe for a while.
        Some(SQLITE_READONLY | SQLITE_IOERR | SQLITE_FULL | SQLITE_CANTOPEN | SQLITE_PROTOCOL) => {
            Class::Unavailable
        }
        _ => Class::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_postgres_states_are_unavailable() {
        for code in [
            "55000", "25006", "57P03", "57P01", "08006", "40001", "53300",
        ] {
            assert_eq!(
                postgres_class(Some(code), None),
                Class::Unavailable,
                "{code}"
            );
        }
        for code in ["23505", "42P01", "22P02", "XX000"] {
            assert_eq!(postgres_class(Some(code), None), Class::Internal, "{code}");
        }
    }

    #[test]
    fn sqlite_codes_are_classified_by_their_primary_code() {
        assert_eq!(sqlite_class(Some(SQLITE_BUSY)), Class::LockTimeout);
        assert_eq!(sqlite_class(Some(SQLITE_LOCKED)), Class::LockTimeout);
        for code in [SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN] {
            assert_eq!(sqlite_class(Some(code)), Class::Unavailable, "{code}");
        }
        assert_eq!(sqlite_class(Some(SQLITE_ERROR)), Class::Internal);
        assert_eq!(sqlite_class(None), Class::Internal);
    }

    #[test]
    fn a_tls_failure_is_misconfigured_and_a_lost_connection_is_not() {
        let tls = StorageError::Unavailable(sqlx::Error::Tls("bad certificate".into()));
        let lost = StorageError::Unavailable(sqlx::Error::PoolTimedOut);

        assert!(tls.is_misconfigured());
        assert!(!lost.is_misconfigured());
        assert!(!StorageError::Config("x".into()).is_misconfigured());
    }

    #[test]
    fn only_a_wait_on_a_key_record_is_a_key_held_elsewhere() {
        let row = "while inserting index tuple (4659,31) in relation \"idempotency_keys\"";
        assert_eq!(postgres_class(Some("55P03"), Some(row)), Class::LockTimeout);
        let locked = "while locking tuple (3,1) in relation \"idempotency_keys\"";
        assert_eq!(
            postgres_class(Some("55P03"), Some(locked)),
            Class::LockTimeout
        );
        let task = "while locking tuple (3,1) in relation \"tasks\"";
        assert_eq!(postgres_class(Some("55P03"), Some(task)), Class::LockWait);
        let german = "beim Sperren von Tupel (3,1) in Relation »idempotency_keys«";
        assert_eq!(
            postgres_class(Some("55P03"), Some(german)),
            Class::LockTimeout
        );
        let index =
            "while inserting index tuple (1,2) in relation \"idempotency_keys_scope_created_at\"";
        assert_eq!(postgres_class(Some("55P03"), Some(index)), Class::LockWait);
        assert_eq!(postgres_class(Some("55P03"), None), Class::LockWait);
    }
}
