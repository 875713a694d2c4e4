//! The real binary: configuration from the environment, SIGTERM, SIGKILL and
//! the `cleanup` subcommand.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use oncely::proto::tasks_v1::task_service_client::TaskServiceClient;
use tonic::transport::Endpoint;

use crate::support::{
    BINARY, Backend, BinaryServer, PgProxy, TestDb, email_request, eventually, keyed, new_key,
    replayed,
};

async fn the_binary_serves_from_environment_settings_and_exits_zero_on_sigterm(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut server = BinaryServer::start(&db).await;
    let channel = Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    TaskServiceClient::new(channel)
        .create_task(keyed(Some(&new_key()), email_request()))
        .await
        .expect("create");

    server.terminate();

    let status = server.wait_for_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    assert_eq!(db.count("tasks").await, 1);
}

async fn a_retry_after_sigkill_and_restart_replays_the_first_response(backend: Backend) {
    let db = TestDb::new(backend).await;
    let key = new_key();
    let mut first_server = BinaryServer::start(&db).await;
    let first = first_server.create_raw(&key).await;
    first_server.child.kill().expect("SIGKILL");
    first_server.child.wait().expect("reap");

    let second_server = BinaryServer::start(&db).await;
    let retry = second_server.create_raw(&key).await;

    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(db.count("tasks").await, 1);
}

async fn the_cleanup_subcommand_prints_what_it_deleted_and_fails_loudly(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = BinaryServer::start(&db).await;
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
            // Port 1 (tcpmux) has no listener on any machine this runs on.
            "127.0.0.1:1",
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
    let mut command = Command::new(BINARY);
    command.current_dir(dir.path()).env_remove("DATABASE_URL");
    let mut server = BinaryServer::spawn(command).await;
    let key = new_key();

    let first = server.create_raw(&key).await;
    let retry = server.create_raw(&key).await;

    assert_eq!(replayed(&first), Some("false"));
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.get_ref(), first.get_ref());
    assert!(dir.path().join("oncely.db").is_file());
    server.terminate();
    assert_eq!(
        server.wait_for_exit(Duration::from_secs(20)).code(),
        Some(0)
    );
}

/// What the binary logs when it cannot reach the database yet and will try
/// again.
const WAITING_FOR_THE_DATABASE: &str = "the database is not available yet; trying again";

/// The binary with `DATABASE_URL` through `proxy`, not yet started.
fn through_proxy(db: &TestDb, proxy: &PgProxy) -> Command {
    let mut command = Command::new(BINARY);
    command
        .env("DATABASE_URL", db.url_via(proxy.port))
        .env("CREATE_DATABASE", "false")
        .env("RUST_LOG", "warn");
    command
}

/// The binary started while its database is away (the proxy to it cut),
/// returned once its log says it waits for it.
async fn launched_with_the_database_away(db: &TestDb) -> (PgProxy, BinaryServer) {
    let proxy = PgProxy::start(db).await;
    proxy.cut();
    let mut server = BinaryServer::launch(through_proxy(db, &proxy));
    server
        .wait_for_log("the binary to find the database away", |line| {
            line["message"] == WAITING_FOR_THE_DATABASE
        })
        .await;
    (proxy, server)
}

/// A server that starts while PostgreSQL is unreachable (restarting,
/// failing over, or starting beside it) waits for it, and serves once it
/// answers; found by the chaos harness, where an instance restarted during
/// a PostgreSQL restart exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_binary_waits_for_a_database_that_is_not_up_yet() {
    let db = TestDb::new(Backend::Postgres).await;
    let (proxy, mut server) = launched_with_the_database_away(&db).await;

    proxy.restore();
    server.wait_until_serving().await;
    let created = server.create_raw(&new_key()).await;

    assert_eq!(replayed(&created), Some("false"));
    assert_eq!(db.count("tasks").await, 1);
}

/// The reads startup makes once the store is open (the API keys first)
/// wait for a database that is unavailable too, and the server then
/// serves. Found by the chaos harness on a Patroni cluster: an instance
/// restarted during a failover found the database after its migrations,
/// then exited on its first read of the API keys, which found no primary.
/// Here the read waits on a lock the test holds on the keys' table until
/// the lock timeout, which is as unavailable as a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn startup_reads_wait_for_an_unavailable_database_too() {
    let db = TestDb::new(Backend::Postgres).await;
    db.migrate_before(i64::MAX).await;
    let lock = db.lock_table("api_keys").await;
    let mut command = Command::new(BINARY);
    command
        .env("DATABASE_URL", &db.url)
        .env("IN_FLIGHT_WAIT", "200ms")
        .env("RUST_LOG", "warn");
    let mut server = BinaryServer::launch(command);
    server
        .wait_for_log("startup to find the API keys unreadable", |line| {
            line["message"]
                == "cannot read the API keys yet: the database is not available; trying again"
        })
        .await;

    lock.rollback().await.expect("release the lock");
    server.wait_until_serving().await;
    let created = server.create_raw(&new_key()).await;
    assert_eq!(replayed(&created), Some("false"));
}

/// Runs `command` to its end, at most `within`; its status and standard
/// error, and how long it ran.
fn run_to_end(
    mut command: Command,
    within: Duration,
) -> (std::process::ExitStatus, String, Duration) {
    let started = std::time::Instant::now();
    let mut child = command
        // Port 0: any free port (it never serves).
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the binary");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            panic!("the binary still ran after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    (status, stderr, started.elapsed())
}

/// It waits at most DB_STARTUP_TIMEOUT, then exits non-zero saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_binary_gives_up_on_the_database_after_the_startup_timeout() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = PgProxy::start(&db).await;
    proxy.cut();
    let mut command = through_proxy(&db, &proxy);
    command.env("DB_STARTUP_TIMEOUT", "1s");

    let (status, stderr, took) = run_to_end(command, Duration::from_secs(15));

    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(took >= Duration::from_secs(1), "{stderr}");
    assert!(stderr.contains("DB_STARTUP_TIMEOUT"), "{stderr}");
}

/// A database that takes connections and never answers cannot hold startup
/// past DB_STARTUP_TIMEOUT either (found by review: it hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_that_never_answers_cannot_hold_startup() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    // Accepts and holds every connection without a byte.
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in silent.incoming().take(64) {
            open.push(stream);
        }
    });
    let mut command = Command::new(BINARY);
    command
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{port}/oncely"),
        )
        .env("DB_STARTUP_TIMEOUT", "1s")
        .env("RUST_LOG", "warn");

    let (status, stderr, took) = run_to_end(command, Duration::from_secs(15));

    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(10), "{took:?}: {stderr}");
    assert!(stderr.contains("DB_STARTUP_TIMEOUT"), "{stderr}");
    drop(held);
}

/// A store that cannot be opened for its settings (an SQLite file in a
/// folder that does not exist, with CREATE_DATABASE=false) fails at once,
/// not after DB_STARTUP_TIMEOUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_misconfigured_database_fails_at_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut command = Command::new(BINARY);
    command
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/missing/oncely.db", dir.path().display()),
        )
        .env("CREATE_DATABASE", "false")
        .env("DB_STARTUP_TIMEOUT", "60s")
        .env("RUST_LOG", "warn");

    let (status, stderr, took) = run_to_end(command, Duration::from_secs(30));

    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}: {stderr}");
    assert!(!stderr.contains("DB_STARTUP_TIMEOUT"), "{stderr}");
}

/// SIGTERM while a try to reach the database hangs stops the server at
/// once, with status 0 (found by review: the signal killed it, 143).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_a_hanging_try_exits_zero() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let held = std::thread::spawn({
        let accepted = accepted.clone();
        move || {
            let mut open = Vec::new();
            for stream in silent.incoming().take(64) {
                open.push(stream);
                accepted.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let mut command = Command::new(BINARY);
    command
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{port}/oncely"),
        )
        .env("RUST_LOG", "warn");
    let mut server = BinaryServer::launch(command);
    // The try hangs once the database's socket has taken its connection.
    eventually(
        Duration::from_secs(30),
        "the binary to try the database",
        || async { (accepted.load(Ordering::SeqCst) > 0).then_some(()) },
    )
    .await;

    server.terminate();

    assert_eq!(
        server.wait_for_exit(Duration::from_secs(20)).code(),
        Some(0)
    );
    drop(held);
}

/// SIGTERM while it waits for the database stops it at once, cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_waiting_for_the_database_exits_zero() {
    let db = TestDb::new(Backend::Postgres).await;
    let (_proxy, mut server) = launched_with_the_database_away(&db).await;
    assert!(
        server.child.try_wait().expect("wait").is_none(),
        "the binary exited while the database was away"
    );

    server.terminate();

    assert_eq!(
        server.wait_for_exit(Duration::from_secs(20)).code(),
        Some(0)
    );
}
