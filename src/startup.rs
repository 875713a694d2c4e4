//! Wiring: connect the store, build the services, serve until shutdown.
//! `serve` opens the store; `serve_with` builds the server ([`build`]) and
//! serves it ([`Built::serve`]), its background tasks held in one `JoinSet` that aborts
//! them whenever it returns. The error type is in `error.rs`; the transport
//! (connection bounds, TLS, accepted sockets, reflection) in `transport.rs`;
//! the refusal to serve an open server beyond loopback in `protection.rs`.

mod error;
mod mcp;
mod protection;
mod tls;
mod transport;

use std::future::Future;

use tokio::{
    net::TcpListener,
    task::{AbortHandle, JoinHandle, JoinSet},
};
use tonic::transport::server::Router;
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::layer::util::{Identity, Stack};

pub use error::StartupError;

use crate::{
    api::{AdminApi, CallStack, TaskApi, WorkerApi, json::JsonApi},
    auth::KeyRing,
    config::Settings,
    health,
    idempotency::{KeyPolicy, LegacyRecords, ReplayCache},
    ops_http,
    proto::tasks_v1::{
        admin_server::AdminServer, task_service_server::TaskServiceServer,
        worker_service_server::WorkerServiceServer,
    },
    storage::{Backend, DatabaseSettings, PgStore, SqliteStore, StorageError, Store, redact_url},
};

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
            Ok(Err(error)) if error.is_transient() && !error.is_misconfigured() => error,
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

/// Makes one of the reads startup needs once the store is open (`what`),
/// trying again while the database is unavailable, as [`open_store`] does,
/// for at most `settings.startup_timeout` more: a failover may begin just
/// after the migrations (found by the chaos harness, where an instance
/// restarted during a failover exited on its first read of the API keys).
/// The last error past that, or any other at once. (A SIGTERM meanwhile is
/// acted on once this wait ends.)
async fn read_at_startup<T, F, Fut>(
    settings: &DatabaseSettings,
    what: &str,
    read: F,
) -> Result<T, StorageError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    let started = tokio::time::Instant::now();
    let mut wait = OPEN_RETRY_FIRST;
    loop {
        match read().await {
            Err(error) if error.is_transient() && !error.is_misconfigured() => {
                let left = settings.startup_timeout.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(error);
                }
                let pause = wait.min(left);
                tracing::warn!(
                    error = %crate::telemetry::chain(&error),
                    retry_in = ?pause,
                    "cannot read {what} yet: the database is not available; trying again"
                );
                tokio::time::sleep(pause).await;
                wait = (wait * 2).min(OPEN_RETRY_MAX);
            }
            result => return result,
        }
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
    // Every background task lives here: dropped (on return, or at an early
    // `?` while building), the set aborts them all.
    let mut background = JoinSet::new();
    let built = build(store, &listener, &settings, &mut background).await?;
    let result = built.serve(listener, &settings, shutdown).await;
    drop(background);
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// The server as [`build`] leaves it: its router, and what its shutdown
/// needs.
struct Built {
    /// The services behind the [`CallStack`], ready to serve.
    router: Router<Stack<CallStack, Stack<JsonApi, Identity>>>,
    /// The TLS the connections are served with, if any.
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Health, set NOT_SERVING and cleared at shutdown.
    reporter: HealthReporter,
    /// The database health watcher, stopped first at shutdown so that it
    /// cannot report SERVING again.
    health_watcher: AbortHandle,
    /// Long polls and waits, told to answer at shutdown.
    events: crate::storage::TaskEvents,
    /// MCP's listener, if any, and its sessions and streams, ended at
    /// shutdown once the calls in flight have answered.
    mcp: Option<mcp::Serving>,
    mcp_sessions: tokio_util::sync::CancellationToken,
    mcp_calls: tokio_util::task::TaskTracker,
}

/// Loads the keys and records the services need, starts the background
/// tasks in `background`, and builds the services behind the call stack.
async fn build<S: Store>(
    store: S,
    listener: &TcpListener,
    settings: &Settings,
    background: &mut JoinSet<()>,
) -> Result<Built, StartupError> {
    let ring = read_at_startup(&settings.database, "the API keys", || {
        KeyRing::load(&store, settings.auth)
    })
    .await
    .map_err(StartupError::Keys)?;
    protection::check(&ring, settings.auth, listener.local_addr().ok())?;
    // MCP's listener is held to the same rule.
    if let Some(addr) = settings.mcp_addr.filter(|addr| !addr.ip().is_loopback()) {
        protection::check(&ring, settings.auth, Some(addr))?;
    }
    if let Some(addr) = settings.metrics_addr {
        let bound = ops_http::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        ops_http::start(
            store.clone(),
            bound,
            settings.metrics_queue_interval,
            background,
        );
    }
    adopt(
        background,
        ring.refresh(store.clone(), settings.key_refresh_interval),
    );
    let policy = KeyPolicy {
        retention: settings.retention,
        missing_key: settings.missing_key_policy,
        dedup_window: settings.dedup_window,
        legacy: settings.legacy_key_scope,
    };
    let legacy = read_at_startup(
        &settings.database,
        "when records of the earlier key scope were last written",
        || LegacyRecords::load(&store, &policy),
    )
    .await
    .map_err(StartupError::LegacyRecords)?;
    if let Some(refresher) = legacy.refresh(store.clone(), policy) {
        adopt(background, refresher);
    }
    let stack = CallStack::new(
        ring.clone(),
        settings.rate_limits,
        settings.request_timeout,
        policy.missing_key,
    );
    background.spawn(forget_idle_callers(stack.clone()));

    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::set_all(reporter.clone(), ServingStatus::NotServing).await;
    let health_watcher = background.spawn(health::watch_database(
        store.clone(),
        reporter.clone(),
        settings.health_check_interval,
    ));
    let events = store.events().clone();
    let reflection_v1 = transport::reflection().build_v1()?;
    let reflection_v1alpha = transport::reflection().build_v1alpha()?;

    let tasks = TaskServiceServer::new(TaskApi::new(
        store.clone(),
        ReplayCache::new(settings.replay_cache_bytes, store.history()),
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

    let tls = settings.tls.as_ref().map(tls::config).transpose()?;
    if let Some(files) = &settings.tls {
        tracing::info!(mtls = files.client_ca.is_some(), "serving TLS");
    }
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tasks)
        .add_service(workers)
        .add_service(admin);
    let mcp_sessions = tokio_util::sync::CancellationToken::new();
    let mcp_calls = tokio_util::task::TaskTracker::new();
    let mut mcp = None;
    if let Some(addr) = settings.mcp_addr {
        let listener = mcp::bind(addr).await?;
        let local = listener.local_addr().unwrap_or(addr);
        // MCP's calls go through the same gates, in this process.
        let app = crate::mcp::router(
            crate::mcp::Tasks::in_process(tower::Layer::layer(&stack, routes.clone())),
            stack.api_keys().clone(),
            &crate::mcp::McpHttpSettings {
                allowed_hosts: settings.mcp_allowed_hosts.clone(),
                max_body_bytes: settings.max_request_bytes,
            },
            local,
            mcp_calls.clone(),
            mcp_sessions.clone(),
        );
        mcp = Some(mcp::start(listener, app, settings, tls.clone(), background));
    }
    let router = transport::builder()
        // Outermost: a JSON call becomes the RPC it names before any gate.
        .layer(JsonApi::new(settings.max_request_bytes))
        .layer(stack)
        .add_routes(routes);
    Ok(Built {
        router,
        tls,
        reporter,
        health_watcher,
        events,
        mcp,
        mcp_sessions,
        mcp_calls,
    })
}

impl Built {
    /// Serves on `listener` until `shutdown`, then for at most the shutdown
    /// grace while in-flight requests finish.
    async fn serve(
        self,
        listener: TcpListener,
        settings: &Settings,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        let Self {
            router,
            tls,
            reporter,
            health_watcher,
            events,
            mcp,
            mcp_sessions,
            mcp_calls,
        } = self;
        match listener.local_addr() {
            Ok(addr) => {
                tracing::info!(%addr, "serving tasks.v1.TaskService, tasks.v1.WorkerService and tasks.v1.Admin")
            }
            Err(error) => tracing::warn!(%error, "serving on a listener without a local address"),
        }
        // Signalled when shutdown starts, to bound how long in-flight requests
        // (and endless streams such as Health/Watch) may hold the exit.
        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let incoming = transport::incoming(listener, settings.connection, tls);
        let (mcp_stop, mcp_stopped) = match mcp {
            Some(serving) => (Some(serving.stop_accepting), Some(serving.stopped)),
            None => (None, None),
        };
        let server = router.serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            // MCP takes no new connection; its calls in flight finish.
            if let Some(stop) = mcp_stop {
                stop.cancel();
            }
            // Long polls and waits answer now rather than hold the exit.
            events.drain();
            health_watcher.abort();
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
        let everything = async move {
            let result = server.await;
            // Once MCP's tool calls in flight have answered (the waits among
            // them were drained), its sessions and streams end, and then
            // its listener closes.
            mcp_calls.close();
            mcp_calls.wait().await;
            mcp_sessions.cancel();
            if let Some(stopped) = mcp_stopped {
                let _ = stopped.await;
            }
            result
        };
        tokio::select! {
            result = everything => Ok(result?),
            () = deadline => {
                tracing::warn!(?grace, "requests still open after the shutdown grace period; stopping anyway");
                Ok(())
            }
        }
    }
}

/// Every minute, forgets the callers and peers whose rate buckets are full
/// again (see [`CallStack::forget_idle`]). Runs until aborted.
async fn forget_idle_callers(stack: CallStack) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        ticker.tick().await;
        stack.forget_idle();
    }
}

/// Puts `task`, spawned by the code that owns it (the key ring's and the
/// legacy records' refreshers), under `background`: aborted with the set.
fn adopt(background: &mut JoinSet<()>, task: JoinHandle<()>) {
    /// Aborts the task when dropped, as dropping a `JoinHandle` does not.
    struct AbortOnDrop(AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let guard = AbortOnDrop(task.abort_handle());
    background.spawn(async move {
        let _guard = guard;
        let _ = task.await;
    });
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
