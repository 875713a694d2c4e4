//! The real server on port 0, clients for it, and request builders.

use std::time::Duration;

use oncely::{
    Settings,
    proto::tasks_v1::{
        CreateTaskRequest, Task, admin_client::AdminClient, task_service_client::TaskServiceClient,
    },
    startup::StartupError,
};
use oncely_client::metadata::IDEMPOTENCY_KEY;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Code, Request, Response, Status,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

use super::{TestDb, eventually, health, raw_unary};

pub(crate) const CREATE_TASK_PATH: &str = "/tasks.v1.TaskService/CreateTask";

/// A running server and clients for it.
pub(crate) struct TestApp {
    pub(crate) channel: Channel,
    pub(crate) tasks: TaskServiceClient<Channel>,
    pub(crate) admin: AdminClient<Channel>,
    pub(crate) addr: std::net::SocketAddr,
    /// Held for the server's life: sending on it, or dropping it, starts a
    /// graceful shutdown. (Tests of shutdown run the binary and send it
    /// SIGTERM, so that they can see when a call is in the server's hands.)
    _shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), StartupError>>>,
}

/// Shows the server's logs when `TEST_LOG` is set; tests are silent
/// otherwise.
pub(crate) fn init_tracing() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = oncely::telemetry::init(oncely::telemetry::LogFormat::Text);
    }
}

/// Settings for a test server on `url`: short waits so failures show fast.
pub(crate) fn test_settings(url: &str) -> Settings {
    let mut settings = Settings::with_database_url(url);
    settings.database.acquire_timeout = Duration::from_secs(2);
    // PostgreSQL test databases exist already; SQLite files do not.
    settings.database.create_database = url.starts_with("sqlite:");
    settings.retention = Duration::from_secs(3600);
    settings.health_check_interval = Duration::from_millis(200);
    // Every test's calls come from one address; the rate tests set their own.
    settings.rate_limits.per_second = None;
    settings
}

/// `settings` without the replay cache, for tests that age records behind
/// the server's back (which a real clock never does): the cache would
/// rightly go on answering from the records as they were written.
pub(crate) fn uncached(mut settings: Settings) -> Settings {
    settings.replay_cache_bytes = 0;
    settings
}

impl TestApp {
    /// Starts a server on `db` with default test settings and waits until it
    /// reports SERVING.
    pub(crate) async fn spawn(db: &TestDb) -> Self {
        Self::spawn_with(test_settings(&db.url)).await
    }

    /// [`TestApp::spawn`] without the replay cache; see [`uncached`].
    pub(crate) async fn spawn_uncached(db: &TestDb) -> Self {
        Self::spawn_with(uncached(test_settings(&db.url))).await
    }

    /// Starts a server with `settings` and waits until it reports SERVING.
    pub(crate) async fn spawn_with(settings: Settings) -> Self {
        let mut app = Self::start(settings).await;
        let serving = eventually(
            Duration::from_secs(60),
            "the server to be SERVING",
            || async {
                if app.server.as_ref().is_some_and(|s| s.is_finished()) {
                    return Some(false);
                }
                matches!(app.health("").await, Ok(ServingStatus::Serving)).then_some(true)
            },
        )
        .await;
        if !serving {
            let result = app.server.take().expect("server handle").await;
            panic!("the server stopped while starting: {result:?}");
        }
        app
    }

    /// Clients for a server that runs elsewhere (the binary, as a child
    /// process, for a test that reads its metrics), with the same helpers;
    /// there is no server here to stop.
    pub(crate) fn connect_to(addr: std::net::SocketAddr) -> Self {
        Self::clients(addr, None, None)
    }

    /// Clients for the server at `addr`, which `shutdown` stops and
    /// `server` runs, when it runs here.
    fn clients(
        addr: std::net::SocketAddr,
        shutdown: Option<oneshot::Sender<()>>,
        server: Option<JoinHandle<Result<(), StartupError>>>,
    ) -> Self {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        Self {
            addr,
            tasks: TaskServiceClient::new(channel.clone()),
            admin: AdminClient::new(channel.clone()),
            channel,
            _shutdown: shutdown,
            server,
        }
    }

    /// Starts a server without waiting for it.
    pub(crate) async fn start(settings: Settings) -> Self {
        init_tracing();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(oncely::serve(listener, settings, async {
            let _ = rx.await;
        }));
        Self::clients(addr, Some(tx), Some(server))
    }

    /// The server's health for `service` ("" for the whole server).
    pub(crate) async fn health(&self, service: &str) -> Result<ServingStatus, Status> {
        health(&self.channel, service).await
    }

    /// Polls health until it is `want`; panics after 30 s.
    #[track_caller]
    pub(crate) fn wait_for_health(&self, want: ServingStatus) -> impl Future<Output = ()> + '_ {
        eventually(
            Duration::from_secs(30),
            format!("health to be {want:?}"),
            move || async move {
                matches!(self.health("").await, Ok(status) if status == want).then_some(())
            },
        )
    }

    /// CreateTask with `key` (none when `None`).
    pub(crate) async fn create(
        &self,
        key: Option<&str>,
        request: CreateTaskRequest,
    ) -> Result<Response<Task>, Status> {
        self.tasks.clone().create_task(keyed(key, request)).await
    }

    /// CreateTask of [`email_request`] with `key`, which must succeed.
    pub(crate) async fn create_with_key(&self, key: &str) -> Response<Task> {
        self.create(Some(key), email_request())
            .await
            .expect("create")
    }

    /// GetTask, which must succeed.
    pub(crate) async fn task(&self, task_id: &str) -> Task {
        self.tasks
            .clone()
            .get_task(oncely::proto::tasks_v1::GetTaskRequest {
                task_id: task_id.into(),
            })
            .await
            .expect("get")
            .into_inner()
    }

    /// CreateTask of the e-mail request under a new key, which must succeed.
    pub(crate) async fn create_email(&self) -> Task {
        self.create_with_key(&new_key()).await.into_inner()
    }

    /// Admin.Cleanup; returns how many records it deleted.
    pub(crate) async fn cleanup(&self, older_than: Option<Duration>) -> Result<i64, Status> {
        let request = oncely::proto::tasks_v1::CleanupRequest {
            older_than: older_than.map(|d| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
        };
        let response = self.admin.clone().cleanup(request).await?;
        Ok(response.into_inner().deleted)
    }

    /// CreateTask with `key`, running in the background.
    pub(crate) fn spawn_create(
        &self,
        key: &str,
        request: CreateTaskRequest,
    ) -> JoinHandle<Result<Response<Task>, Status>> {
        let mut tasks = self.tasks.clone();
        let request = keyed(Some(key), request);
        tokio::spawn(async move { tasks.create_task(request).await })
    }

    /// Sends already-encoded bytes to `path` and returns the raw response.
    pub(crate) async fn raw_call(
        &self,
        path: &'static str,
        key: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Response<Vec<u8>>, Status> {
        raw_unary(self.channel.clone(), path, keyed(key, body)).await
    }

    /// Stops the server abruptly, as a crash would: no graceful shutdown.
    pub(crate) async fn kill(mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Sends `count` CreateTask calls released together at a barrier: call `i`
/// goes to `apps[i % apps.len()]` with key `key(i)` (none for `None`).
/// Returns the answers in call order.
pub(crate) async fn create_all_at_once(
    apps: &[&TestApp],
    count: usize,
    key: impl Fn(usize) -> Option<String>,
) -> Vec<Result<Response<Task>, Status>> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(count));
    let calls = (0..count).map(|i| {
        let mut client = apps[i % apps.len()].tasks.clone();
        let barrier = barrier.clone();
        let request = keyed(key(i).as_deref(), email_request());
        tokio::spawn(async move {
            barrier.wait().await;
            client.create_task(request).await
        })
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|joined| joined.expect("join"))
        .collect()
}

pub(crate) fn keyed<T>(key: Option<&str>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert(IDEMPOTENCY_KEY, key.parse().expect("key is valid metadata"));
    }
    request
}

pub(crate) fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub(crate) fn request(
    agent_id: &str,
    action: &str,
    parameters: serde_json::Value,
) -> CreateTaskRequest {
    CreateTaskRequest {
        agent_id: agent_id.into(),
        action: action.into(),
        parameters: Some(
            oncely_client::json::to_struct(parameters).expect("parameters are an object"),
        ),
    }
}

pub(crate) fn email_request() -> CreateTaskRequest {
    request(
        "agent-7",
        "send_email",
        serde_json::json!({"to": "ada@example.com", "subject": "hello", "attempt": 1}),
    )
}

pub(crate) fn replayed<T>(response: &Response<T>) -> Option<&str> {
    response
        .metadata()
        .get("idempotent-replayed")
        .and_then(|v| v.to_str().ok())
}

/// Asserts `result` failed with INVALID_ARGUMENT and `ErrorInfo.reason`.
#[track_caller]
pub(crate) fn assert_invalid<T: std::fmt::Debug>(
    result: Result<T, Status>,
    reason: &str,
) -> Status {
    assert_status(result, Code::InvalidArgument, Some(reason))
}

/// Asserts `result` failed with `code` and, when given, `ErrorInfo.reason`.
#[track_caller]
pub(crate) fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    reason: Option<&str>,
) -> Status {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert!(!status.message().is_empty(), "the error message is empty");
    if let Some(reason) = reason {
        let info = status
            .get_details_error_info()
            .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
        assert_eq!(info.reason, reason);
        assert_eq!(info.domain, "oncely");
    }
    status
}

/// The fields named by a `BadRequest` detail.
#[track_caller]
pub(crate) fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"))
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// Leases one task as `worker-1`, on `workers`; panics when none is
/// available.
pub(crate) async fn lease_one(
    workers: &mut oncely::proto::tasks_v1::worker_service_client::WorkerServiceClient<Channel>,
) -> oncely::proto::tasks_v1::Lease {
    workers
        .lease_tasks(oncely::proto::tasks_v1::LeaseTasksRequest {
            worker_id: "worker-1".into(),
            ..Default::default()
        })
        .await
        .expect("lease")
        .into_inner()
        .leases
        .pop()
        .expect("a lease")
}
