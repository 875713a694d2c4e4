//! Configuration from flags and environment variables.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    api::{ConnectionLimits, RateLimits},
    api_keys_cmd::KeysArgs,
    auth::AuthMode,
    cleanup_cmd::CleanupArgs,
    domain::Limits,
    idempotency::{LegacyScope, MissingKeyPolicy},
    mcp::McpArgs,
    queue::QueuePolicy,
    storage::DatabaseSettings,
    telemetry::LogFormat,
};

/// The database used when `DATABASE_URL` is unset: the embedded SQLite
/// store, in a file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://oncely.db";

/// oncely: idempotent task creation for agents that retry.
#[derive(Debug, Parser)]
#[command(name = "oncely", version, about, long_about = None)]
pub struct Cli {
    /// Server settings, used when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// What to do; serving when none is given.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (the default).
    Serve,
    /// Ask a running server to delete expired idempotency records (for cron).
    Cleanup(CleanupArgs),
    /// Create, list and revoke API keys, in the database of DATABASE_URL.
    Keys(KeysArgs),
    /// Serve MCP (the Model Context Protocol) on stdin/stdout, calling a
    /// running server: the command a desktop agent spawns.
    Mcp(McpArgs),
}

/// The server's flags; each can also be set by the environment variable
/// named beside it.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Where to keep data: sqlite://PATH (the embedded store, one process) or
    /// postgres://... (production, several instances). Created if missing.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true, hide_default_value = false)]
    pub database_url: String,
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:50051")]
    pub listen_addr: SocketAddr,
    /// How long a key is remembered, such as 24h or 90s; older records are
    /// treated as absent and deleted by cleanup.
    #[arg(long, env = "IDEMPOTENCY_RETENTION", default_value = "24h", value_parser = retention_duration)]
    pub idempotency_retention: Duration,
    /// What to do with a CreateTask without idempotency-key: reject it, or
    /// deduplicate it by fingerprint within --dedup-window.
    #[arg(long, env = "MISSING_KEY_POLICY", value_enum, default_value = "reject")]
    pub missing_key_policy: MissingKeyPolicy,
    /// Under the fingerprint policy: how long an identical keyless request
    /// counts as a repeat, such as 5m.
    #[arg(long, env = "DEDUP_WINDOW", default_value = "5m", value_parser = retention_duration)]
    pub dedup_window: Duration,
    /// Records of the earlier, per-API-key scope: read (honour them while
    /// any may be live), dual (also write each record in that scope, for
    /// a rolling upgrade from such a version; PostgreSQL) or off.
    #[arg(long, env = "LEGACY_KEY_SCOPE", value_enum, default_value = "read")]
    pub legacy_key_scope: LegacyScope,
    /// How long a request waits for a concurrent request with the same key
    /// before answering ABORTED.
    #[arg(long, env = "IN_FLIGHT_WAIT", default_value = "5s", value_parser = wait_duration)]
    pub in_flight_wait: Duration,
    /// The most database connections.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub db_pool_size: u32,
    /// How long a request waits for a database connection before answering
    /// UNAVAILABLE.
    #[arg(long, env = "DB_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub db_acquire_timeout: Duration,
    /// How long startup waits for a database that does not answer yet
    /// (starting, restarting, failing over) before exiting with an error.
    #[arg(long, env = "DB_STARTUP_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub db_startup_timeout: Duration,
    /// Create the database if it does not exist (true or false).
    #[arg(long, env = "CREATE_DATABASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_database: bool,
    /// The largest request message accepted, in bytes.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_request_bytes: u32,
    /// The largest `parameters` accepted, in bytes of canonical JSON.
    #[arg(long, env = "MAX_PARAMETERS_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(2..))]
    pub max_parameters_bytes: u32,
    /// How many records cleanup deletes per transaction.
    #[arg(long, env = "CLEANUP_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub cleanup_batch_size: u32,
    /// How often health checks ask the database whether it answers.
    #[arg(long, env = "HEALTH_CHECK_INTERVAL", default_value = "1s", value_parser = positive_duration)]
    pub health_check_interval: Duration,
    /// How long a worker's lease lasts when it does not ask for a duration.
    #[arg(long, env = "DEFAULT_LEASE_DURATION", default_value = "30s", value_parser = lease_duration)]
    pub default_lease_duration: Duration,
    /// How many times a task may be leased before it ends FAILED (failed
    /// attempts and leases that ran out both count).
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub max_attempts: i32,
    /// The retry backoff after a task's first failed attempt; it doubles with
    /// each attempt, with full jitter.
    #[arg(long, env = "RETRY_BACKOFF", default_value = "1s", value_parser = positive_duration)]
    pub retry_backoff: Duration,
    /// The longest retry backoff.
    #[arg(long, env = "RETRY_BACKOFF_MAX", default_value = "10m", value_parser = positive_duration)]
    pub retry_backoff_max: Duration,
    /// How often a waiting LeaseTasks long poll or WaitTask reads the
    /// database again without being woken: when backoffs and expired
    /// leases are noticed, and the most a lost wake-up costs.
    #[arg(long, env = "QUEUE_RECHECK_INTERVAL", default_value = "1s", value_parser = positive_duration)]
    pub queue_recheck_interval: Duration,
    /// Whether calls need an API key: auto (as soon as a key exists; until
    /// then only a loopback address is served), required, or disabled.
    #[arg(long, env = "AUTH", value_enum, default_value = "auto")]
    pub auth: AuthMode,
    /// How often the server reloads the API keys, so that a created or
    /// revoked key takes effect on every instance.
    #[arg(long, env = "KEY_REFRESH_INTERVAL", default_value = "2s", value_parser = positive_duration)]
    pub key_refresh_interval: Duration,
    /// Calls per second each caller (an API key; without keys, a peer
    /// address) may make; 0 for no limit. One key often serves a whole
    /// platform of agents, so the default is above what one instance
    /// commits, not a share of it: the share is MAX_IN_FLIGHT_PER_CALLER's
    /// (docs/configuration.md, "One key, many agents").
    #[arg(long, env = "RATE_LIMIT", default_value_t = 10_000)]
    pub rate_limit: u32,
    /// How many calls a caller may make at once beyond its rate.
    #[arg(long, env = "RATE_BURST", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_burst: u32,
    /// The most calls the server works on at once (long polls included);
    /// past it, calls are shed with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// The most calls one caller (an API key; without keys, a peer address)
    /// may have open at once, long polls included.
    #[arg(long, env = "MAX_IN_FLIGHT_PER_CALLER", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight_per_caller: u32,
    /// The most bytes of live idempotency records kept in memory, so that
    /// replays are answered without the database; 0 turns the cache off.
    #[arg(long, env = "REPLAY_CACHE_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub replay_cache_bytes: u64,
    /// The most bytes of answers the server holds at once, from when they
    /// are made until the caller has read them; past it, calls are shed
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_ANSWER_BYTES", default_value_t = 128 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(1024 * 1024..))]
    pub max_answer_bytes: u32,
    /// How long a connection may stay open without a call before the server
    /// closes it (counted from the connection's start, too).
    #[arg(long, env = "CONNECTION_IDLE_TIMEOUT", default_value = "2m", value_parser = positive_duration)]
    pub connection_idle_timeout: Duration,
    /// The longest a PostgreSQL statement may run before the database
    /// cancels it (the call answers UNAVAILABLE).
    #[arg(long, env = "STATEMENT_TIMEOUT", default_value = "30s", value_parser = wait_duration)]
    pub statement_timeout: Duration,
    /// The longest any call may take; long polls answer before it.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "90s", value_parser = positive_duration)]
    pub request_timeout: Duration,
    /// A PEM certificate chain to serve TLS with (with --tls-key).
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// A PEM CA: clients must show a certificate it signed (mTLS).
    #[arg(long, env = "TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Where to serve Prometheus metrics (GET /metrics) over HTTP, such as
    /// 127.0.0.1:9464; off when unset.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// How often each instance reads the queue (tasks by status, the oldest
    /// wait) from the database for the metrics.
    #[arg(long, env = "METRICS_QUEUE_INTERVAL", default_value = "15s", value_parser = positive_duration)]
    pub metrics_queue_interval: Duration,
    /// Where to serve MCP (the Model Context Protocol) over streamable HTTP
    /// at /mcp, such as 127.0.0.1:8765; off when unset. Same API keys
    /// (agent keys, as `authorization: Bearer`), same TLS.
    #[arg(long, env = "MCP_ADDR")]
    pub mcp_addr: Option<SocketAddr>,
    /// The Host header values /mcp answers, comma-separated (against DNS
    /// rebinding), besides localhost, 127.0.0.1, ::1 and MCP_ADDR's own
    /// address; `*` answers any.
    #[arg(long, env = "MCP_ALLOWED_HOSTS", value_delimiter = ',')]
    pub mcp_allowed_hosts: Vec<String>,
    /// How log lines are written to standard error: text, or one JSON
    /// object per line.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// How long shutdown waits for in-flight requests before exiting anyway.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = positive_duration)]
    pub shutdown_grace: Duration,
}

/// How long after the request timeout a call may take to send its answer
/// before its connection is closed.
const CALL_GRACE: Duration = Duration::from_secs(30);

/// How long a health `Watch` stream may stay open before its connection is
/// closed (the client then watches again on a new one).
const STREAM_LIMIT: Duration = Duration::from_secs(3600);

/// The longest duration any setting accepts: ten years.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration such as 24h, 90s or 500ms"))?;
    if duration < Duration::from_millis(1) {
        return Err("the duration must be at least 1ms".into());
    }
    if duration > MAX_DURATION {
        return Err("the duration must be at most ten years".into());
    }
    // The database counts in microseconds.
    Ok(Duration::from_micros(duration.as_micros() as u64))
}

/// A wait that PostgreSQL's `lock_timeout` can hold: at most one hour.
fn wait_duration(text: &str) -> Result<Duration, String> {
    let duration = positive_duration(text)?;
    if duration > Duration::from_secs(3600) {
        return Err("the wait must be at most 1h".into());
    }
    Ok(duration)
}

/// A lease between one second and one hour, as LeaseTasks accepts.
fn lease_duration(text: &str) -> Result<Duration, String> {
    let duration = positive_duration(text)?;
    if duration < Duration::from_secs(1) || duration > Duration::from_secs(3600) {
        return Err("the lease must be from 1s to 1h".into());
    }
    Ok(duration)
}

/// A retention of at least one second.
fn retention_duration(text: &str) -> Result<Duration, String> {
    let duration = positive_duration(text)?;
    if duration < Duration::from_secs(1) {
        return Err("the retention must be at least 1s".into());
    }
    Ok(duration)
}

/// The files of the server's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// Its PEM private key.
    pub key: std::path::PathBuf,
    /// A PEM CA that must have signed the clients' certificates (mTLS).
    pub client_ca: Option<std::path::PathBuf>,
}

/// Everything the server needs, resolved from [`ServeArgs`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen (used by [`crate::run`]; [`crate::serve`] takes a bound
    /// listener instead).
    pub listen_addr: SocketAddr,
    /// The database.
    pub database: DatabaseSettings,
    /// Key records older than this are treated as absent.
    pub retention: Duration,
    /// What a missing key means.
    pub missing_key_policy: MissingKeyPolicy,
    /// Keyless records older than this are treated as absent.
    pub dedup_window: Duration,
    /// What records of the earlier, per-API-key scope count for.
    pub legacy_key_scope: LegacyScope,
    /// Request field limits.
    pub limits: Limits,
    /// Leases, attempts and retries.
    pub queue: QueuePolicy,
    /// Whether calls need an API key.
    pub auth: AuthMode,
    /// How often the API keys are reloaded.
    pub key_refresh_interval: Duration,
    /// Per-caller rates and the in-flight bound.
    pub rate_limits: RateLimits,
    /// TLS for the gRPC listener, if any.
    pub tls: Option<TlsFiles>,
    /// The longest any call may take.
    pub request_timeout: Duration,
    /// How long a connection may stay idle, and a call open (answer sent
    /// included), before the server closes the connection.
    pub connection: ConnectionLimits,
    /// The largest request message, in bytes.
    pub max_request_bytes: usize,
    /// The replay cache's capacity in bytes; 0 for none.
    pub replay_cache_bytes: u64,
    /// Cleanup's batch size.
    pub cleanup_batch_size: i64,
    /// The health check period.
    pub health_check_interval: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Where to serve metrics over HTTP, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// How often the queue is read for the metrics.
    pub metrics_queue_interval: Duration,
    /// Where to serve MCP over streamable HTTP, if anywhere.
    pub mcp_addr: Option<SocketAddr>,
    /// The Host header values MCP answers besides loopback's and its own.
    pub mcp_allowed_hosts: Vec<String>,
}

impl From<ServeArgs> for Settings {
    fn from(args: ServeArgs) -> Self {
        Self {
            listen_addr: args.listen_addr,
            database: DatabaseSettings {
                url: args.database_url,
                max_connections: args.db_pool_size,
                acquire_timeout: args.db_acquire_timeout,
                in_flight_wait: args.in_flight_wait,
                statement_timeout: args.statement_timeout,
                create_database: args.create_database,
                startup_timeout: args.db_startup_timeout,
            },
            retention: args.idempotency_retention,
            missing_key_policy: args.missing_key_policy,
            dedup_window: args.dedup_window,
            legacy_key_scope: args.legacy_key_scope,
            limits: Limits {
                max_parameters_bytes: args.max_parameters_bytes as usize,
            },
            queue: QueuePolicy {
                default_lease: args.default_lease_duration,
                max_attempts: args.max_attempts,
                backoff_base: args.retry_backoff,
                backoff_max: args.retry_backoff_max.max(args.retry_backoff),
                recheck: args.queue_recheck_interval,
                request_timeout: args.request_timeout,
            },
            auth: args.auth,
            key_refresh_interval: args.key_refresh_interval,
            request_timeout: args.request_timeout,
            tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| TlsFiles {
                cert,
                key,
                client_ca: args.tls_client_ca,
            }),
            rate_limits: RateLimits {
                per_second: std::num::NonZeroU32::new(args.rate_limit),
                burst: std::num::NonZeroU32::new(args.rate_burst)
                    .unwrap_or(std::num::NonZeroU32::MIN),
                max_in_flight: args.max_in_flight as usize,
                max_in_flight_per_caller: args.max_in_flight_per_caller as usize,
                max_answer_bytes: args.max_answer_bytes as usize,
            },
            connection: ConnectionLimits {
                idle_timeout: args.connection_idle_timeout,
                // Time to send the answer, after the longest call.
                call_limit: args.request_timeout + CALL_GRACE,
                stream_limit: STREAM_LIMIT,
            },
            max_request_bytes: args.max_request_bytes as usize,
            replay_cache_bytes: args.replay_cache_bytes,
            cleanup_batch_size: i64::from(args.cleanup_batch_size),
            health_check_interval: args.health_check_interval,
            shutdown_grace: args.shutdown_grace,
            metrics_addr: args.metrics_addr,
            metrics_queue_interval: args.metrics_queue_interval,
            mcp_addr: args.mcp_addr,
            mcp_allowed_hosts: args.mcp_allowed_hosts,
        }
    }
}

impl Settings {
    /// The defaults, as if no flag or variable were set, with `database_url`.
    pub fn with_database_url(database_url: impl Into<String>) -> Self {
        let mut args = Cli::parse_from(["oncely"]).serve;
        args.database_url = database_url.into();
        args.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_debug_output_holds_no_password() {
        let settings = Settings::with_database_url("postgres://app:hunter2@db/oncely");
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn durations_are_human() {
        assert_eq!(positive_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(positive_duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(positive_duration("0s").is_err());
        assert_eq!(positive_duration("1500us"), Ok(Duration::from_micros(1500)));
        assert!(positive_duration("20years").is_err());
        assert!(retention_duration("500ms").is_err());
        assert!(wait_duration("2h").is_err());
        assert!(positive_duration("soon").is_err());
    }

    #[test]
    fn the_missing_key_policy_and_window_parse_from_flags() {
        let cli = Cli::try_parse_from([
            "oncely",
            "--missing-key-policy",
            "fingerprint",
            "--dedup-window",
            "90s",
        ])
        .unwrap();
        assert_eq!(cli.serve.missing_key_policy, MissingKeyPolicy::Fingerprint);
        assert_eq!(cli.serve.dedup_window, Duration::from_secs(90));
        let default = Cli::try_parse_from(["oncely"]).unwrap();
        assert_eq!(default.serve.missing_key_policy, MissingKeyPolicy::Reject);
        assert_eq!(default.serve.dedup_window, Duration::from_secs(300));
        assert!(Cli::try_parse_from(["oncely", "--missing-key-policy", "allow"]).is_err());
    }

    #[test]
    fn named_settings_parse_from_the_names_the_docs_give() {
        let cli = Cli::try_parse_from([
            "oncely",
            "--auth",
            "required",
            "--log-format",
            "json",
            "--legacy-key-scope",
            "dual",
        ])
        .unwrap();
        assert_eq!(cli.serve.auth, AuthMode::Required);
        assert_eq!(cli.serve.log_format, LogFormat::Json);
        assert_eq!(cli.serve.legacy_key_scope, LegacyScope::Dual);
        let default = Cli::try_parse_from(["oncely"]).unwrap();
        assert_eq!(default.serve.auth, AuthMode::Auto);
        assert_eq!(default.serve.log_format, LogFormat::Text);
        assert_eq!(default.serve.legacy_key_scope, LegacyScope::Read);
        for (flag, value) in [
            ("--auth", "none"),
            ("--log-format", "xml"),
            ("--legacy-key-scope", "both"),
        ] {
            let error = Cli::try_parse_from(["oncely", flag, value]).unwrap_err();
            assert!(error.to_string().contains("possible values"), "{error}");
        }
    }

    #[test]
    fn the_default_rate_is_a_ceiling_for_one_key_of_many_agents() {
        // docs/configuration.md, "One key, many agents".
        let default = Cli::try_parse_from(["oncely"]).unwrap().serve;
        assert_eq!((default.rate_limit, default.rate_burst), (10_000, 20_000));
        assert_eq!(default.max_in_flight_per_caller, 256);
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
