//! The real `oncely` binary as a child process, configured from the
//! environment as an operator would.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use prost::Message;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{CREATE_TASK_PATH, TestDb, email_request, eventually, health, keyed, raw_unary};

/// The binary cargo built for these tests.
pub(crate) const BINARY: &str = env!("CARGO_BIN_EXE_oncely");

/// A port nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running `oncely` process; killed when dropped.
pub(crate) struct BinaryServer {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl BinaryServer {
    /// Starts the binary on `db` and `port` and waits until it is SERVING.
    pub(crate) async fn start(db: &TestDb, port: u16) -> Self {
        let addr = format!("127.0.0.1:{port}");
        let mut command = Command::new(BINARY);
        command
            .env("DATABASE_URL", &db.url)
            .env("IDEMPOTENCY_RETENTION", "1h")
            .env("RUST_LOG", "warn");
        Self::spawn(command, addr).await
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
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(BINARY);
        command
            .env("DATABASE_URL", &db.url)
            .env("METRICS_ADDR", &metrics)
            .env("METRICS_QUEUE_INTERVAL", "100ms")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied());
        let server = Self::spawn(command, format!("127.0.0.1:{}", free_port())).await;
        (server, metrics)
    }

    /// Starts `command` (the binary, configured) listening on `addr`, and
    /// waits until it is SERVING. Its logs show when `TEST_LOG` is set.
    pub(crate) async fn spawn(mut command: Command, addr: String) -> Self {
        command.stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        Self::spawn_keeping_stderr(command, addr).await
    }

    /// Like [`spawn`](Self::spawn), with standard error as `command` set it
    /// (a file, to read the logs afterwards).
    pub(crate) async fn spawn_keeping_stderr(mut command: Command, addr: String) -> Self {
        let child = command
            .env("LISTEN_ADDR", &addr)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the binary");
        let server = Self { child, addr };
        eventually(
            Duration::from_secs(20),
            "the binary to be SERVING",
            || async {
                let channel = Endpoint::from_shared(server.url())
                    .expect("url")
                    .connect()
                    .await
                    .ok()?;
                matches!(health(&channel, "").await, Ok(ServingStatus::Serving)).then_some(())
            },
        )
        .await;
        server
    }

    /// The server's address as a URL.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
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

    /// Waits for the process to exit, at most `within`.
    pub(crate) fn wait_for_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the binary did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
