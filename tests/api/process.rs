//! The real binary: configuration from the environment, SIGTERM, SIGKILL and
//! the `cleanup` subcommand.

use crate::helpers::Backend;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use oncely::proto::tasks_v1::task_service_client::TaskServiceClient;
use prost::Message;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{CREATE_TASK_PATH, RawCodec, TestDb, email_request, keyed, new_key, replayed};

const BINARY: &str = env!("CARGO_BIN_EXE_oncely");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    async fn start(db: &TestDb, port: u16) -> Self {
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(BINARY)
            .env("DATABASE_URL", &db.url)
            .env("LISTEN_ADDR", &addr)
            .env("IDEMPOTENCY_RETENTION", "1h")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start the binary");
        let server = Self { child, addr };
        server.wait_until_serving().await;
        server
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn wait_until_serving(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(channel) = Endpoint::from_shared(self.url())
                .expect("url")
                .connect()
                .await
            {
                let status = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().status());
                if matches!(status, Ok(ServingStatus::Serving)) {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the binary never became SERVING"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn create_raw(&self, key: &str) -> tonic::Response<Vec<u8>> {
        let channel = Endpoint::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        grpc.unary(
            keyed(Some(key), email_request().encode_to_vec()),
            http::uri::PathAndQuery::from_static(CREATE_TASK_PATH),
            RawCodec,
        )
        .await
        .expect("create")
    }

    fn wait_for_exit(&mut self, within: Duration) -> std::process::ExitStatus {
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

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn the_binary_serves_from_environment_settings_and_exits_zero_on_sigterm(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut server = Server::start(&db, free_port()).await;
    let channel = Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    TaskServiceClient::new(channel)
        .create_task(keyed(Some(&new_key()), email_request()))
        .await
        .expect("create");

    let kill = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(kill.success());

    let status = server.wait_for_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    assert_eq!(db.count("tasks").await, 1);
}

async fn a_retry_after_sigkill_and_restart_replays_the_first_response(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = free_port();
    let key = new_key();
    let mut first_server = Server::start(&db, port).await;
    let first = first_server.create_raw(&key).await;
    first_server.child.kill().expect("SIGKILL");
    first_server.child.wait().expect("reap");

    let second_server = Server::start(&db, port).await;
    let retry = second_server.create_raw(&key).await;

    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(db.count("tasks").await, 1);
}

async fn the_cleanup_subcommand_prints_what_it_deleted_and_fails_loudly(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db, free_port()).await;
    server.create_raw(&new_key()).await;
    db.age_keys(Duration::from_secs(7200)).await;
    server.create_raw(&new_key()).await;

    let output = Command::new(BINARY)
        .args(["cleanup", "--server", &server.url(), "--older-than", "1h"])
        .output()
        .expect("run cleanup");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "cleanup failed: {output:?}");
    assert_eq!(
        stdout.trim(),
        "oncely cleanup: deleted 1 idempotency records older than 1h"
    );
    assert_eq!(db.count("idempotency_keys").await, 1);

    let unreachable = Command::new(BINARY)
        .args([
            "cleanup",
            "--server",
            &format!("127.0.0.1:{}", free_port()),
            "--timeout",
            "3s",
        ])
        .output()
        .expect("run cleanup");
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("oncely cleanup: failed"));
}

conformance!(
    the_binary_serves_from_environment_settings_and_exits_zero_on_sigterm,
    a_retry_after_sigkill_and_restart_replays_the_first_response,
    the_cleanup_subcommand_prints_what_it_deleted_and_fails_loudly,
);

#[tokio::test]
async fn without_database_url_the_binary_keeps_its_data_in_an_embedded_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(BINARY)
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .env("LISTEN_ADDR", &addr)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the binary");
    let mut server = Server { child, addr };
    server.wait_until_serving().await;
    let key = new_key();

    let first = server.create_raw(&key).await;
    let retry = server.create_raw(&key).await;

    assert_eq!(replayed(&first), Some("false"));
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.get_ref(), first.get_ref());
    assert!(dir.path().join("oncely.db").is_file());
    let kill = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(kill.success());
    assert_eq!(
        server.wait_for_exit(Duration::from_secs(20)).code(),
        Some(0)
    );
}
