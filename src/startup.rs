//! Wiring: connect the store, build the services, serve until shutdown.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};
use tonic_health::ServingStatus;

use crate::{
    api::{AdminApi, CallStack, GuardedIo, TaskApi, WorkerApi},
    auth::{AuthMode, KeyRing},
    config::{Settings, TlsFiles},
    health,
    idempotency::{KeyPolicy, LegacyRecords, ReplayCache},
    ops_http,
    proto::{
        FILE_DESCRIPTOR_SET,
        tasks_v1::{
            admin_server::AdminServer, task_service_server::TaskServiceServer,
            worker_service_server::WorkerServiceServer,
        },
    },
    storage::{Backend, DatabaseSettings, PgStore, SqliteStore, StorageError, Store, redact_url},
};

/// The most calls one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// The largest header block (metadata) a call may send, in bytes.
const MAX_HEADER_BYTES: u32 = 16 * 1024;
/// How long a connection may be silent before the kernel probes whether its
/// peer is still there.
const TCP_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be prepared.
    #[error("cannot prepare the database at {url}")]
    Database {
        /// The redacted URL.
        url: String,
        /// The cause.
        #[source]
        source: StorageError,
    },
    /// The database stayed unavailable for all of DB_STARTUP_TIMEOUT.
    #[error(
        "the database at {url} did not become available within {waited:?} (DB_STARTUP_TIMEOUT)"
    )]
    DatabaseTimeout {
        /// The redacted URL.
        url: String,
        /// How long startup waited.
        waited: std::time::Duration,
        /// The last attempt's error.
        #[source]
        source: StorageError,
    },
    /// No API key exists and the address is not a loopback one.
    #[error(
        "refusing to serve on {addr} without API keys: anyone who can reach it could call every method. Create a key first (`oncely keys create --name admin --role admin`, then agent and worker keys), or listen on a loopback address, or set AUTH=disabled if the network is trusted"
    )]
    Unprotected {
        /// The address.
        addr: std::net::SocketAddr,
    },
    /// A TLS file could not be read.
    #[error("cannot read the TLS file {path}")]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The API keys could not be read.
    #[error("cannot read the API keys")]
    Keys(#[source] StorageError),
    /// When records of the earlier key scope were last written could not
    /// be read (or, with LEGACY_KEY_SCOPE=dual, noted).
    #[error("cannot read when records of the earlier, per-API-key scope were last written")]
    LegacyRecords(#[source] StorageError),
    /// The database URL names no known store.
    #[error("DATABASE_URL {0:?} names no store oncely knows; use postgres://... or sqlite://PATH")]
    UnknownDatabase(String),
    /// Reflection could not load the descriptors.
    #[error("cannot build server reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("the gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `settings.listen_addr` and serves until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> Result<(), StartupError> {
    let addr = settings.listen_addr;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })?;
    serve(listener, settings, shutdown_signal()).await
}

/// Serves on an already-bound listener until `shutdown` completes; then
/// reports NOT_SERVING, stops accepting and finishes in-flight requests.
/// The store is picked by the database URL's scheme.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    let database = &settings.database;
    let mut shutdown = std::pin::pin!(shutdown);
    match Backend::of_url(&database.url) {
        Some(Backend::Postgres) => {
            match open_store(database, || PgStore::connect(database), shutdown.as_mut()).await? {
                Some(store) => serve_with(store, listener, settings, shutdown).await,
                None => Ok(()),
            }
        }
        Some(Backend::Sqlite) => {
            match open_store(
                database,
                || SqliteStore::connect(database),
                shutdown.as_mut(),
            )
            .await?
            {
                Some(store) => serve_with(store, listener, settings, shutdown).await,
                None => Ok(()),
            }
        }
        None => Err(StartupError::UnknownDatabase(redact_url(&database.url))),
    }
}

/// The first wait between attempts to open the store; it doubles up to
/// [`OPEN_RETRY_MAX`].
const OPEN_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const OPEN_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// The least time one try to open the store gets.
const OPEN_TRY_MIN: std::time::Duration = std::time::Duration::from_millis(500);

/// Errors that are worth retrying for a running server but, when opening
/// the store, say the settings are wrong: a TLS mismatch (the server does
/// not speak TLS, or a certificate is refused), an SQLite file that cannot
/// be opened or written (a missing folder, permissions). Startup fails at
/// once on them rather than waiting out DB_STARTUP_TIMEOUT.
fn is_misconfigured(error: &StorageError) -> bool {
    let source = match error {
        StorageError::Unavailable(source) | StorageError::Internal(source) => source,
        _ => return false,
    };
    match source {
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            // SQLITE_READONLY (8) and SQLITE_CANTOPEN (14), extended codes
            // included.
            db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                && db
                    .code()
                    .and_then(|code| code.parse::<i32>().ok())
                    .is_some_and(|code| matches!(code & 0xff, 8 | 14))
        }
        _ => false,
    }
}

/// Opens the store with `connect`, trying again while the database is
/// unavailable (starting, restarting, failing over, its file locked), for
/// at most `settings.startup_timeout`. Anything else fails at once.
/// `None` when `shutdown` comes first.
async fn open_store<S, F, Fut>(
    settings: &DatabaseSettings,
    connect: F,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<S>, StartupError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<S, StorageError>>,
{
    let url = redact_url(&settings.url);
    let started = tokio::time::Instant::now();
    let mut wait = OPEN_RETRY_FIRST;
    loop {
        // Each try gets the time left (at least OPEN_TRY_MIN): a database
        // that takes connections and never answers cannot hold startup.
        let left = settings
            .startup_timeout
            .saturating_sub(started.elapsed())
            .max(OPEN_TRY_MIN);
        let attempt = tokio::select! {
            attempt = tokio::time::timeout(left, connect()) => attempt,
            () = &mut shutdown => return Ok(None),
        };
        let source = match attempt {
            Ok(Ok(store)) => return Ok(Some(store)),
            Ok(Err(error)) if error.is_transient() && !is_misconfigured(&error) => error,
            Ok(Err(source)) => return Err(StartupError::Database { url, source }),
            Err(_) => StorageError::Unavailable(sqlx::Error::PoolTimedOut),
        };
        let waited = started.elapsed();
        let Some(left) = settings
            .startup_timeout
            .checked_sub(waited)
            .filter(|l| !l.is_zero())
        else {
            return Err(StartupError::DatabaseTimeout {
                url,
                waited,
                source,
            });
        };
        // The last attempt is made as the time runs out.
        let pause = wait.min(left);
        tracing::warn!(
            error = %crate::telemetry::chain(&source),
            retry_in = ?pause,
            "the database is not available yet; trying again"
        );
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = &mut shutdown => return Ok(None),
        }
        wait = (wait * 2).min(OPEN_RETRY_MAX);
    }
}

/// Serves `store`; see [`serve`].
async fn serve_with<S: Store>(
    store: S,
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    tracing::info!(store = %store.describe(), "database ready");

    let ring = KeyRing::load(&store, settings.auth)
        .await
        .map_err(StartupError::Keys)?;
    check_protection(&ring, settings.auth, listener.local_addr().ok())?;
    let ops = match settings.metrics_addr {
        Some(addr) => {
            let bound = ops_http::bind(addr)
                .await
                .map_err(|source| StartupError::Bind { addr, source })?;
            Some(ops_http::start(
                store.clone(),
                bound,
                settings.metrics_queue_interval,
            ))
        }
        None => None,
    };
    let key_refresher = ring.refresh(store.clone(), settings.key_refresh_interval);
    let policy = KeyPolicy {
        retention: settings.retention,
        missing_key: settings.missing_key_policy,
        dedup_window: settings.dedup_window,
        legacy: settings.legacy_key_scope,
    };
    let legacy = LegacyRecords::load(&store, &policy)
        .await
        .map_err(StartupError::LegacyRecords)?;
    let legacy_refresher = legacy.refresh(store.clone(), policy);
    let stack = CallStack::new(
        ring.clone(),
        settings.rate_limits,
        settings.request_timeout,
        policy.missing_key,
    );
    let forgetter = tokio::spawn({
        let stack = stack.clone();
        async move {
            let mut ticker = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                ticker.tick().await;
                stack.forget_idle();
            }
        }
    });

    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::set_all(reporter.clone(), ServingStatus::NotServing).await;
    let watcher = tokio::spawn(health::watch_database(
        store.clone(),
        reporter.clone(),
        settings.health_check_interval,
    ));

    let watcher_abort = watcher.abort_handle();
    let events = store.events().clone();
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let tasks = TaskServiceServer::new(TaskApi::new(
        store.clone(),
        ReplayCache::new(settings.replay_cache_bytes),
        policy,
        settings.limits,
        settings.queue,
        ring,
        legacy,
    ))
    .max_decoding_message_size(settings.max_request_bytes);
    let workers = WorkerServiceServer::new(WorkerApi::new(
        store.clone(),
        settings.queue,
        settings.limits,
    ))
    .max_decoding_message_size(settings.max_request_bytes);
    let admin = AdminServer::new(AdminApi::new(store, policy, settings.cleanup_batch_size))
        .max_decoding_message_size(settings.max_request_bytes);

    match listener.local_addr() {
        Ok(addr) => {
            tracing::info!(%addr, "serving tasks.v1.TaskService, tasks.v1.WorkerService and tasks.v1.Admin")
        }
        Err(error) => tracing::warn!(%error, "serving on a listener without a local address"),
    }
    // Signalled when shutdown starts, to bound how long in-flight requests
    // (and endless streams such as Health/Watch) may hold the exit.
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    // Bounds on what a connection may hold: dead peers are found by
    // keepalive pings; streams, headers and calls are bounded.
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // A client may give up on every call it has open at once (a batch
        // of calls cancelled together, all reset before the server took
        // them); h2's default of 20 closed such a connection with
        // ENHANCE_YOUR_CALM. A flood past what a connection may have open
        // still is.
        .http2_max_pending_accept_reset_streams(Some(MAX_STREAMS_PER_CONNECTION as usize))
        .http2_max_header_list_size(Some(MAX_HEADER_BYTES))
        // Each call's span: request id, method, trace context.
        .trace_fn(crate::telemetry::request_span);
    if let Some(tls) = &settings.tls {
        builder = builder.tls_config(server_tls(tls)?)?;
        tracing::info!(mtls = tls.client_ca.is_some(), "serving TLS");
    }
    // Every accepted socket answers without Nagle's delay (a small answer
    // would otherwise wait for the peer's delayed ACK), has the kernel probe
    // a silent peer, and is closed when idle or holding a call too long.
    let connection_limits = settings.connection;
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE))
        .map(move |accepted| accepted.map(|io| GuardedIo::new(io, connection_limits)));
    let server = builder
        .layer(stack)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tasks)
        .add_service(workers)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            // Long polls and waits answer now rather than hold the exit.
            events.drain();
            watcher_abort.abort();
            health::set_all(reporter.clone(), ServingStatus::NotServing).await;
            health::clear_all(reporter).await;
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = draining_tx.send(());
        });
    let grace = settings.shutdown_grace;
    let deadline = async move {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!(?grace, "requests still open after the shutdown grace period; stopping anyway");
            Ok(())
        }
    };
    watcher.abort();
    key_refresher.abort();
    if let Some(refresher) = legacy_refresher {
        refresher.abort();
    }
    forgetter.abort();
    drop(ops);
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// The server's TLS from its files: its identity, and the CA clients'
/// certificates must be signed by, for mTLS.
fn server_tls(files: &TlsFiles) -> Result<ServerTlsConfig, StartupError> {
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|source| StartupError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

/// Like Redis's protected mode: with no key and no explicit setting, the
/// server serves only a loopback address. Logs what the setting means.
fn check_protection(
    ring: &KeyRing,
    mode: AuthMode,
    addr: Option<std::net::SocketAddr>,
) -> Result<(), StartupError> {
    match mode {
        AuthMode::Disabled => {
            tracing::warn!(
                "AUTH=disabled: every call is let in without an API key; only for a trusted network"
            );
        }
        AuthMode::Required if !ring.any_key() => {
            tracing::warn!(
                "AUTH=required and no API key exists: every call but health and reflection is refused until one is created (`oncely keys create`)"
            );
        }
        AuthMode::Auto if !ring.any_key() => match addr {
            Some(addr) if addr.ip().is_loopback() => tracing::info!(
                "no API key exists: serving without authentication on a loopback address; calls need keys as soon as one is created"
            ),
            // An address that is not loopback, or one that cannot be told:
            // refuse rather than serve open.
            addr => {
                return Err(StartupError::Unprotected {
                    addr: addr.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
                });
            }
        },
        _ => tracing::info!("calls need an API key"),
    }
    Ok(())
}

/// Reflection over our protos, the health protocol, and the `google.rpc`
/// error details, so grpcurl can describe services and decode `ErrorInfo`.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_signal() -> impl Future<Output = ()> + Send {
    // The handlers are installed now, not when the future is first polled:
    // a signal while the database is still being opened stops the server
    // cleanly rather than killing it.
    #[cfg(unix)]
    let listen = |kind: tokio::signal::unix::SignalKind, name: &'static str| {
        let signal = tokio::signal::unix::signal(kind);
        async move {
            match signal {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot listen for {name}");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    #[cfg(unix)]
    let (interrupt, terminate) = (
        listen(tokio::signal::unix::SignalKind::interrupt(), "SIGINT"),
        listen(tokio::signal::unix::SignalKind::terminate(), "SIGTERM"),
    );
    #[cfg(not(unix))]
    let (interrupt, terminate) = (
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
        std::future::pending::<()>(),
    );
    async move {
        tokio::select! {
            () = interrupt => tracing::info!("received SIGINT"),
            () = terminate => tracing::info!("received SIGTERM"),
        }
    }
}
