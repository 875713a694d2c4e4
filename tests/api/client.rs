//! The Rust client: one key per logical call, safe retries, and the retry
//! loop proven against a connection that breaks after the server answered.

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use oncely_client::{ClientError, Created, OncelyClient, RetryPolicy};
use tonic::Code;

use crate::support::{
    BINARY, Backend, BinaryApp, BinaryServer, DroppingProxy, PgProxy, TestApp, TestDb,
    email_request, new_key, request, rpc, scrape_until, value,
};

fn quick_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        attempt_timeout: Duration::from_secs(10),
        total_timeout: Duration::from_secs(30),
    }
}

fn client_for(addr: SocketAddr) -> OncelyClient {
    OncelyClient::connect(format!("http://{addr}"))
        .expect("address")
        .with_retry_policy(quick_policy())
}

async fn a_response_lost_on_the_way_is_retried_with_the_same_key_and_replayed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let proxy = DroppingProxy::start(app.addr, 1).await;
    let client = client_for(proxy.addr);

    let created = client.create_task(email_request()).await.expect("created");

    assert_eq!(
        proxy.dropped.load(Ordering::SeqCst),
        1,
        "no response was dropped"
    );
    // Usually 2; a retry that races the cut connection's teardown takes 3.
    assert!(created.attempts >= 2);
    assert!(created.replayed, "the retry should get the stored response");
    assert_eq!(db.count("tasks").await, 1);
    let stored_task = db.key_record(&created.key).await.expect("record").task_id;
    assert_eq!(stored_task, created.task.task_id);
}

async fn the_client_reports_whether_an_answer_was_a_replay(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let client = client_for(app.addr);

    let first = client.create_task(email_request()).await.expect("create");
    let again = client
        .create_task_with_key(&first.key, email_request())
        .await
        .expect("again");

    assert!(!first.replayed);
    assert_eq!(first.attempts, 1);
    assert!(uuid::Uuid::parse_str(&first.key).is_ok_and(|k| k.get_version_num() == 4));
    assert_eq!(
        again,
        Created {
            replayed: true,
            ..first
        }
    );
    assert_eq!(db.count("tasks").await, 1);
}

async fn the_client_reads_tasks_back_by_id_and_by_page(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let client = client_for(app.addr);
    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(
            client
                .create_task(email_request())
                .await
                .expect("create")
                .task,
        );
    }

    let got = client.get_task(&created[0].task_id).await.expect("get");
    let first = client
        .list_tasks("agent-7", 2, "")
        .await
        .expect("first page");
    let rest = client
        .list_tasks("agent-7", 2, &first.next_page_token)
        .await
        .expect("second page");
    let unknown = client
        .get_task(&uuid::Uuid::new_v4().to_string())
        .await
        .expect_err("no such task");

    assert_eq!(got, created[0]);
    assert_eq!(first.tasks, created[..2]);
    assert_eq!(rest.tasks, created[2..]);
    assert!(rest.next_page_token.is_empty());
    assert!(
        matches!(&unknown, ClientError::Rejected(s) if s.code() == Code::NotFound),
        "{unknown:?}"
    );
}

async fn the_client_never_retries_invalid_argument_or_failed_precondition(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let client = client_for(app.addr);
    let first = client.create_task(email_request()).await.expect("create");

    let invalid = client
        .create_task(request("", "send_email", serde_json::json!({})))
        .await
        .expect_err("invalid");
    let reused = client
        .create_task_with_key(
            &first.key,
            request("agent-7", "send_sms", serde_json::json!({})),
        )
        .await
        .expect_err("reused");

    assert!(
        matches!(&invalid, ClientError::Rejected(s) if s.code() == Code::InvalidArgument),
        "{invalid:?}"
    );
    assert!(
        matches!(&reused, ClientError::Rejected(s) if s.code() == Code::FailedPrecondition),
        "{reused:?}"
    );
    assert_eq!(db.count("tasks").await, 1);
}

async fn the_client_waits_out_a_request_in_progress_as_retry_info_asks(backend: Backend) {
    let db = TestDb::new(backend).await;
    // A bound of seconds: on SQLite it covers the wait for the writer too,
    // and a shorter one could run out there on a busy machine (answered
    // UNAVAILABLE) before the writer found the key held (ABORTED, with
    // RetryInfo).
    let in_flight_wait = Duration::from_secs(3);
    let app = BinaryApp::start(&db, &[("IN_FLIGHT_WAIT", "3s")]).await;
    let key = new_key();
    let (in_flight, first) = db.begin_in_flight(&key, &email_request()).await;
    let client = client_for(app.addr);
    let started = std::time::Instant::now();

    let creating = tokio::spawn({
        let key = key.clone();
        async move { client.create_task_with_key(&key, email_request()).await }
    });
    // Committed once an attempt has met the open transaction.
    scrape_until(&app.metrics, "an attempt answered in progress", |scrape| {
        let labels = [("outcome", "in_progress"), ("key_source", "header")];
        value(scrape, "oncely_create_requests_total", &labels) >= Some(1.0)
    })
    .await;
    in_flight.commit().await;
    let created = creating
        .await
        .expect("join")
        .expect("replayed after the wait");

    assert!(created.replayed);
    assert_eq!(created.task, first);
    assert!(created.attempts >= 2);
    // The first attempt waited out the bound; then the server's RetryInfo
    // asked for a second before the next (the policy's own backoff is at
    // most 200 ms).
    let waited = started.elapsed();
    assert!(
        waited >= in_flight_wait + Duration::from_secs(1),
        "{waited:?}"
    );
}

async fn the_client_gives_up_after_its_attempts(backend: Backend) {
    let _ = backend;
    // Port 1 (tcpmux) has no listener on any machine this runs on.
    let client = OncelyClient::connect("http://127.0.0.1:1")
        .expect("address")
        .with_retry_policy(RetryPolicy {
            max_attempts: 3,
            ..quick_policy()
        });

    let error = client
        .create_task(email_request())
        .await
        .expect_err("no server");

    assert!(
        matches!(&error, ClientError::GaveUp { attempts: 3, last } if last.code() == Code::Unavailable),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_retries_while_the_database_is_down_and_creates_once_it_returns() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = PgProxy::start(&db).await;
    // The binary, whose metrics show when an attempt has failed.
    let mut command = std::process::Command::new(BINARY);
    command
        .env("DATABASE_URL", db.url_via(proxy.port))
        .env("CREATE_DATABASE", "false")
        .env("RUST_LOG", "warn");
    let (server, metrics) = BinaryServer::spawn_with_metrics(command).await;
    let metrics = format!("http://{metrics}/metrics");
    let client = client_for(server.addr()).with_retry_policy(RetryPolicy {
        max_attempts: 100,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(300),
        ..quick_policy()
    });
    proxy.cut();

    let creating = tokio::spawn(async move { client.create_task(email_request()).await });
    // Restored once an attempt has failed for want of the database.
    scrape_until(&metrics, "an attempt answered unavailable", |scrape| {
        let mut labels = rpc("tasks.v1.TaskService", "CreateTask");
        labels.push(("grpc_code", "Unavailable"));
        value(scrape, "grpc_server_handled_total", &labels) >= Some(1.0)
    })
    .await;
    proxy.restore();
    let created = creating.await.expect("join").expect("created");

    assert!(
        created.attempts >= 2,
        "the first attempt should have failed"
    );
    assert_eq!(db.count("tasks").await, 1);
}

conformance!(
    a_response_lost_on_the_way_is_retried_with_the_same_key_and_replayed,
    the_client_reports_whether_an_answer_was_a_replay,
    the_client_reads_tasks_back_by_id_and_by_page,
    the_client_never_retries_invalid_argument_or_failed_precondition,
    the_client_waits_out_a_request_in_progress_as_retry_info_asks,
    the_client_gives_up_after_its_attempts,
);
