//! Test harness: a fresh database per test, the real server on port 0, real
//! gRPC clients, and a switchable TCP proxy in front of PostgreSQL.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::{Buf, BufMut};
use oncely::{
    Settings,
    api::IDEMPOTENCY_KEY_HEADER,
    proto::tasks_v1::{
        CreateTaskRequest, Task, admin_client::AdminClient, task_service_client::TaskServiceClient,
    },
    startup::StartupError,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tonic::{
    Code, Request, Response, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

pub(crate) const CREATE_TASK_PATH: &str = "/tasks.v1.TaskService/CreateTask";

pub(crate) use crate::test_db::{Backend, TestDb};

/// A running server and clients for it.
pub(crate) struct TestApp {
    pub(crate) channel: Channel,
    pub(crate) tasks: TaskServiceClient<Channel>,
    pub(crate) admin: AdminClient<Channel>,
    pub(crate) addr: std::net::SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), StartupError>>>,
}

pub(crate) fn init_tracing() {
    if std::env::var_os("TEST_LOG").is_some() {
        oncely::telemetry::init();
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
    settings
}

impl TestApp {
    /// Starts a server on `db` with default test settings and waits until it
    /// reports SERVING.
    pub(crate) async fn spawn(db: &TestDb) -> Self {
        Self::spawn_with(test_settings(&db.url)).await
    }

    pub(crate) async fn spawn_with(settings: Settings) -> Self {
        let mut app = Self::start(settings).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if app.server.as_ref().is_some_and(|s| s.is_finished()) {
                let result = app.server.take().expect("server handle").await;
                panic!("the server stopped while starting: {result:?}");
            }
            if matches!(app.health("").await, Ok(ServingStatus::Serving)) {
                return app;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server never became SERVING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
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
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        Self {
            addr,
            tasks: TaskServiceClient::new(channel.clone()),
            admin: AdminClient::new(channel.clone()),
            channel,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    pub(crate) async fn health(&self, service: &str) -> Result<ServingStatus, Status> {
        let response = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?;
        Ok(response.into_inner().status())
    }

    /// Polls health until it is `want`; panics after 15 s.
    #[track_caller]
    pub(crate) fn wait_for_health(&self, want: ServingStatus) -> impl Future<Output = ()> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let got = self.health("").await;
                if matches!(got, Ok(status) if status == want) {
                    return;
                }
                if tokio::time::Instant::now() > deadline {
                    panic!("{caller}: health never became {want:?}; last answer {got:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// CreateTask with `key` (none when `None`).
    pub(crate) async fn create(
        &self,
        key: Option<&str>,
        request: CreateTaskRequest,
    ) -> Result<Response<Task>, Status> {
        self.tasks.clone().create_task(keyed(key, request)).await
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
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        grpc.unary(
            keyed(key, body),
            http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
    }

    /// Stops the server gracefully and waits for it.
    pub(crate) async fn shutdown(mut self) -> Result<(), StartupError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server
            .take()
            .expect("server handle")
            .await
            .expect("server task did not panic")
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
        request.metadata_mut().insert(
            IDEMPOTENCY_KEY_HEADER,
            key.parse().expect("key is valid metadata"),
        );
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
        parameters: Some(oncely::domain::json_to_struct(
            parameters.as_object().expect("parameters are an object"),
        )),
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

/// A codec that passes bytes through, to send hand-encoded requests and see
/// responses exactly as they crossed the wire.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// A TCP proxy in front of PostgreSQL that a test can cut and restore, to
/// make the database go away and come back.
pub(crate) struct PgProxy {
    pub(crate) port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl PgProxy {
    pub(crate) async fn start(db: &TestDb) -> Self {
        let (host, port) = db.server();
        let upstream = format!("{host}:{port}");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let up = up.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let handle = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    connections.lock().expect("lock").push(handle);
                }
            }
        });
        Self {
            port,
            up,
            connections,
            accept,
        }
    }

    /// Refuses new connections and cuts every open one.
    pub(crate) fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for handle in self.connections.lock().expect("lock").drain(..) {
            handle.abort();
        }
    }

    /// Lets connections through again.
    pub(crate) fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
