//! How to reach the database, and how to name it in logs without its
//! password.

use std::{fmt, time::Duration};

/// Which store a database URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `postgres://` or `postgresql://`.
    Postgres,
    /// `sqlite:`, the embedded store.
    Sqlite,
}

impl Backend {
    /// The backend for `url`, by its scheme.
    pub fn of_url(url: &str) -> Option<Self> {
        let scheme = url.split(':').next()?.to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Some(Self::Postgres),
            "sqlite" => Some(Self::Sqlite),
            _ => None,
        }
    }
}

/// How to reach the database and how to use it.
#[derive(Clone)]
pub struct DatabaseSettings {
    /// A `postgres://` or `sqlite://` URL; may hold a password, so never
    /// logged as is.
    pub url: String,
    /// The most connections the pool opens.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection (and for a new
    /// connection to open) before it fails as UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// How long a statement waits for a lock, in particular for a concurrent
    /// request holding the same idempotency key, before giving up.
    pub in_flight_wait: Duration,
    /// Create the database (or SQLite file) named in `url` when it does not
    /// exist yet.
    pub create_database: bool,
    /// The longest a PostgreSQL statement may run before the database
    /// cancels it (`statement_timeout`), whatever it waits for.
    pub statement_timeout: Duration,
    /// How long startup waits for an unavailable database (starting,
    /// restarting, failing over) before giving up.
    pub startup_timeout: Duration,
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("in_flight_wait", &self.in_flight_wait)
            .field("create_database", &self.create_database)
            .field("statement_timeout", &self.statement_timeout)
            .field("startup_timeout", &self.startup_timeout)
            .finish()
    }
}

/// A database URL with its password replaced by `***`, for logs: both the
/// `user:password@` form and a `password=` query parameter.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let authority_end = before_query.find('/').unwrap_or(before_query.len());
    let (authority, path) = before_query.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let mut redacted = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&pairs.join("&"));
    }
    redacted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://db/oncely?user=app&password=hunter2&sslmode=require"),
            "postgres://db/oncely?user=app&password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://app:s3cr:et@db:5432/oncely?sslmode=require"),
            "postgres://app:***@db:5432/oncely?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://app@db/oncely"),
            "postgres://app@db/oncely"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn debug_output_holds_no_password() {
        let settings = DatabaseSettings {
            url: "postgres://app:hunter2@db/oncely".into(),
            max_connections: 1,
            acquire_timeout: Duration::from_secs(1),
            in_flight_wait: Duration::from_secs(1),
            create_database: false,
            statement_timeout: Duration::from_secs(30),
            startup_timeout: Duration::from_secs(30),
        };
        assert!(!format!("{settings:?}").contains("hunter2"));
    }
}
