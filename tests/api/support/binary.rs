//! The real `oncely` binary as a child process, configured from the
//! environment as an operator would.
//!
//! It listens on `LISTEN_ADDR=127.0.0.1:0` (and `METRICS_ADDR=127.0.0.1:0`
//! when a test wants its metrics): port 0 binds any free port, and the
//! binary's log says which one it got. The test reads the address from
//! there, so no port is picked, released and hoped to be still free when
//! the binary binds it. The binary logs JSON lines (`LOG_FORMAT=json`),
//! which the test keeps; they show on standard error when `TEST_LOG` is set.

use std::{
    ffi::OsStr,
    io::BufRead,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prost::Message;
use tonic::transport::Endpoint;

use super::{
    Backend, CREATE_TASK_PATH, TestApp, TestDb, email_request, is_serving, keyed, raw_unary,
    started,
};

/// The binary cargo built for these tests.
pub(crate) const BINARY: &str = env!("CARGO_BIN_EXE_oncely");

/// The line the binary logs, with its gRPC address in `addr`, once it
/// serves.
const SERVING: &str = "serving tasks.v1.TaskService, tasks.v1.WorkerService and tasks.v1.Admin";
/// The line the binary logs, with the address in `addr`, once its metrics
/// listener (METRICS_ADDR) is bound.
const SERVING_METRICS: &str = "serving metrics on /metrics and the status page on /";
/// The line the binary logs, with the address in `addr`, once its MCP
/// listener (MCP_ADDR) is bound.
const SERVING_MCP: &str = "serving MCP (streamable HTTP) at /mcp";
/// The log directives that keep those two lines (info, in these modules).
const ADDRESS_LINES: &str = "oncely::startup=info,oncely::ops_http=info";

/// The longest a test waits for the binary to log something or to serve:
/// far longer than it takes, even on a busy machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// How often the log and the process are checked.
const POLL: Duration = Duration::from_millis(50);

/// What the binary has written to standard error so far, line by line.
#[derive(Clone, Default)]
struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    /// Whether standard error has ended (the process is gone).
    ended: Arc<AtomicBool>,
}

impl Log {
    /// Reads `stderr` to its end in a thread of its own, keeping each line
    /// (and echoing it when `TEST_LOG` is set).
    fn drain(stderr: impl std::io::Read + Send + 'static) -> Self {
        let log = Self::default();
        let echo = std::env::var_os("TEST_LOG").is_some();
        std::thread::spawn({
            let log = log.clone();
            move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if echo {
                        eprintln!("{line}");
                    }
                    log.lines.lock().expect("lock").push(line);
                }
                log.ended.store(true, Ordering::SeqCst);
            }
        });
        log
    }

    /// The first line, read as JSON, for which `wanted` holds.
    fn find(&self, wanted: &impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .find(|line| wanted(line))
    }

    /// Every line so far.
    fn text(&self) -> String {
        self.lines.lock().expect("lock").join("\n")
    }

    /// The last lines, to show why a wait failed.
    fn tail(&self) -> String {
        let lines = self.lines.lock().expect("lock");
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// `RUST_LOG` for the binary: what the test set (or the tests inherit),
/// with the info lines that give the addresses when it would leave them
/// out. (A filter at info or finer keeps them already, and adding the
/// directives would make those modules quieter than it asks.)
fn log_filter(command: &Command) -> String {
    let set = command
        .get_envs()
        .find(|(name, _)| *name == OsStr::new("RUST_LOG"))
        .map(|(_, value)| value.map(|v| v.to_string_lossy().into_owned()));
    let filter = match set {
        Some(value) => value,
        None => std::env::var("RUST_LOG").ok(),
    };
    // The binary logs at info when RUST_LOG is unset.
    let Some(filter) = filter.filter(|f| !f.trim().is_empty()) else {
        return "info".to_owned();
    };
    let global = filter
        .split(',')
        .map(str::trim)
        .find(|directive| !directive.contains('='));
    match global {
        Some("info" | "debug" | "trace") => filter,
        _ => format!("{filter},{ADDRESS_LINES}"),
    }
}

/// A running `oncely` process; killed when dropped.
pub(crate) struct BinaryServer {
    pub(crate) child: Child,
    log: Log,
    /// Its gRPC address, once it has said it.
    addr: Option<SocketAddr>,
}

impl BinaryServer {
    /// Starts the binary on `db` and waits until it is SERVING.
    pub(crate) async fn start(db: &TestDb) -> Self {
        let mut command = Command::new(BINARY);
        command
            .env("DATABASE_URL", &db.url)
            .env("IDEMPOTENCY_RETENTION", "1h")
            .env("RUST_LOG", "warn");
        Self::spawn(command).await
    }

    /// Starts the binary on `db` with its metrics listener (METRICS_ADDR)
    /// on a port of its own, reading the queue every 100 ms; returns it and
    /// that listener's address.
    pub(crate) async fn start_with_metrics(db: &TestDb) -> (Self, String) {
        Self::start_with_metrics_and(db, &[]).await
    }

    /// [`start_with_metrics`](Self::start_with_metrics) with `env` set too.
    pub(crate) async fn start_with_metrics_and(
        db: &TestDb,
        env: &[(&str, &str)],
    ) -> (Self, String) {
        let mut command = Command::new(BINARY);
        command
            .env("DATABASE_URL", &db.url)
            // As the test settings and TestDb's records have it.
            .env("IDEMPOTENCY_RETENTION", "1h")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied());
        Self::spawn_with_metrics(command).await
    }

    /// Starts the binary on `db` with `env` set and MCP (MCP_ADDR) on a port
    /// of its own; returns it and the URL of its `/mcp`.
    pub(crate) async fn start_with_mcp(db: &TestDb, env: &[(&str, &str)]) -> (Self, String) {
        let mut command = Command::new(BINARY);
        command
            .env("DATABASE_URL", &db.url)
            .env("IDEMPOTENCY_RETENTION", "1h")
            .env("RUST_LOG", "warn")
            .env("MCP_ADDR", "127.0.0.1:0")
            .envs(env.iter().copied());
        let mut server = Self::spawn(command).await;
        let url = server.mcp_url().await;
        (server, url)
    }

    /// The URL of the binary's `/mcp` (it was started with MCP_ADDR), from
    /// its log.
    pub(crate) async fn mcp_url(&mut self) -> String {
        let line = self
            .wait_for_log("the MCP listener's address", |line| {
                line["message"] == SERVING_MCP
            })
            .await;
        let addr = line["addr"].as_str().expect("an address").to_owned();
        format!("http://{addr}/mcp")
    }

    /// Starts `command` (the binary, configured) with its metrics listener
    /// on a port of its own, reading the queue every 100 ms; waits until it
    /// is SERVING and returns it and the metrics listener's address.
    pub(crate) async fn spawn_with_metrics(mut command: Command) -> (Self, String) {
        command
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("METRICS_QUEUE_INTERVAL", "100ms");
        let mut server = Self::spawn(command).await;
        let metrics = server
            .wait_for_log("the metrics listener's address", |line| {
                line["message"] == SERVING_METRICS
            })
            .await;
        let metrics = metrics["addr"].as_str().expect("an address").to_owned();
        (server, metrics)
    }

    /// Starts `command` (the binary, configured) and waits until it is
    /// SERVING. It listens on a port of its own unless `command` sets
    /// LISTEN_ADDR.
    pub(crate) async fn spawn(command: Command) -> Self {
        let mut server = Self::launch(command);
        server.wait_until_serving().await;
        server
    }

    /// Starts `command` (the binary, configured) without waiting for
    /// anything: for tests of what it does before it serves.
    pub(crate) fn launch(mut command: Command) -> Self {
        let listens = command
            .get_envs()
            .any(|(name, value)| name == OsStr::new("LISTEN_ADDR") && value.is_some());
        if !listens {
            // Port 0: any free port; the log says which.
            command.env("LISTEN_ADDR", "127.0.0.1:0");
        }
        let mut child = command
            .env("RUST_LOG", log_filter(&command))
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the binary");
        let log = Log::drain(child.stderr.take().expect("piped standard error"));
        Self {
            child,
            log,
            addr: None,
        }
    }

    /// Waits until the binary logs the address it serves on, and then
    /// until it answers SERVING there.
    pub(crate) async fn wait_until_serving(&mut self) {
        let serving = self
            .wait_for_log("the binary to serve", |line| line["message"] == SERVING)
            .await;
        let addr: SocketAddr = serving["addr"]
            .as_str()
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {serving}"));
        self.addr = Some(addr);
        let url = self.url();
        self.wait_for("the binary to be SERVING", || async {
            is_serving(&url).await.then_some(())
        })
        .await;
    }

    /// Waits until the binary logs a line (read as JSON) for which `wanted`
    /// holds, and returns it; panics, showing the log, if the binary exits
    /// first or after a minute.
    #[track_caller]
    pub(crate) fn wait_for_log<'a>(
        &'a mut self,
        what: &'a str,
        wanted: impl Fn(&serde_json::Value) -> bool + 'a,
    ) -> impl Future<Output = serde_json::Value> + 'a {
        let log = self.log.clone();
        self.wait_for(what, move || {
            let found = log.find(&wanted);
            async move { found }
        })
    }

    /// Calls `check` until it gives `Some`, as [`eventually`](super::eventually)
    /// does; panics with the log's last lines if the binary exits first.
    #[track_caller]
    fn wait_for<'a, T, Fut>(
        &'a mut self,
        what: &'a str,
        mut check: impl FnMut() -> Fut + 'a,
    ) -> impl Future<Output = T> + 'a
    where
        Fut: Future<Output = Option<T>> + 'a,
    {
        let caller = std::panic::Location::caller();
        async move {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                if let Some(value) = check().await {
                    return value;
                }
                if let Some(status) = self.child.try_wait().expect("wait") {
                    // Let the last lines in.
                    self.wait_for_log_end();
                    panic!(
                        "{caller}: the binary exited ({status}) while waiting for {what}; its log:\n{}",
                        self.log.tail()
                    );
                }
                if tokio::time::Instant::now() > deadline {
                    panic!(
                        "{caller}: gave up after {PATIENCE:?} waiting for {what}; the binary's log:\n{}",
                        self.log.tail()
                    );
                }
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// Everything the binary has logged so far, one JSON object a line;
    /// after [`wait_for_exit`](Self::wait_for_exit), all it logged.
    pub(crate) fn log(&self) -> String {
        self.log.text()
    }

    /// The address the binary serves on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr.expect("the binary serves (wait_until_serving)")
    }

    /// The server's address as a URL.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// A CreateTask of the e-mail request with `key`, answered as raw bytes.
    pub(crate) async fn create_raw(&self, key: &str) -> tonic::Response<Vec<u8>> {
        let channel = Endpoint::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        raw_unary(
            channel,
            CREATE_TASK_PATH,
            keyed(Some(key), email_request().encode_to_vec()),
        )
        .await
        .expect("create")
    }

    /// Sends the process SIGTERM.
    pub(crate) fn terminate(&self) {
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("send SIGTERM");
        assert!(kill.success());
    }

    /// Waits for the process to exit, at most `within`, and for the last
    /// of its log.
    #[track_caller]
    pub(crate) fn wait_for_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the binary did not exit within {within:?}; its log:\n{}",
                self.log.tail()
            );
            std::thread::sleep(POLL);
        };
        self.wait_for_log_end();
        status
    }

    /// Waits until standard error has ended, once the process is gone.
    fn wait_for_log_end(&self) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while !self.log.ended.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the binary's standard error stays open after it exited"
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary with its metrics listener, and the [`TestApp`] helpers for
/// it (through `Deref`): for conformance tests that must see a call in the
/// server's hands, which only a process of its own shows (in-process
/// servers share their metrics with every test running at the time).
pub(crate) struct BinaryApp {
    pub(crate) server: BinaryServer,
    /// The URL of its metrics.
    pub(crate) metrics: String,
    app: TestApp,
}

impl BinaryApp {
    /// Starts the binary on `db` with `env` set and waits until it serves.
    pub(crate) async fn start(db: &TestDb, env: &[(&str, &str)]) -> Self {
        let (server, metrics) = BinaryServer::start_with_metrics_and(db, env).await;
        let app = TestApp::connect_to(server.addr());
        Self {
            server,
            metrics: format!("http://{metrics}/metrics"),
            app,
        }
    }

    /// Waits until `calls` calls of the TaskService's `method` are in the
    /// server's hands, blocked behind a transaction the test holds on
    /// `db`. On PostgreSQL the evidence is the server's sessions waiting
    /// for the lock. SQLite shows no lock wait to another process; there
    /// it is the server counting the calls started, after which all they
    /// can do is wait for the lock or run out of time.
    pub(crate) async fn blocked(&self, db: &TestDb, method: &str, calls: usize) {
        match db.backend() {
            Backend::Postgres => {
                let sessions = i64::try_from(calls).expect("a few calls");
                db.wait_for_sessions_waiting_for_a_lock(sessions).await;
            }
            Backend::Sqlite => {
                started(&self.metrics, "tasks.v1.TaskService", method, calls).await;
            }
        }
    }
}

impl std::ops::Deref for BinaryApp {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.app
    }
}
