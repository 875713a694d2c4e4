//! The order of the gates every call passes through (`src/api/stack.rs`):
//! each test fails if two gates trade places, by a refusal that only the
//! written order gives.

use std::{net::Ipv4Addr, num::NonZeroU32};

use oncely::{
    auth::AuthMode,
    proto::tasks_v1::{
        GetTaskRequest, LeaseTasksRequest, task_service_client::TaskServiceClient,
        worker_service_client::WorkerServiceClient,
    },
};
use tonic::{Code, Status, transport::Endpoint};

use crate::support::{
    Backend, BinaryApp, BinaryServer, TestApp, TestDb, assert_status, email_request, rpc,
    scrape_until, test_settings, value,
};

/// A key no server accepts: a space is outside visible ASCII.
const MALFORMED_KEY: &str = "not a key";

/// CreateTask with [`MALFORMED_KEY`], until a call is refused for another
/// reason than its key (at most 100): how many were refused for the key
/// first, and that refusal.
async fn bad_keys_until_refused_otherwise(app: &TestApp) -> (u32, Status) {
    let mut for_the_key = 0;
    for _ in 0..100 {
        match app.create(Some(MALFORMED_KEY), email_request()).await {
            Err(status) if status.code() == Code::InvalidArgument => for_the_key += 1,
            Err(status) => return (for_the_key, status),
            Ok(_) => panic!("a malformed key was accepted"),
        }
    }
    panic!("100 calls in a row were refused for their key only")
}

#[tokio::test]
async fn who_calls_is_checked_before_the_idempotency_key() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.auth = AuthMode::Required;
    let app = TestApp::spawn_with(settings).await;

    let refused = app.create(Some(MALFORMED_KEY), email_request()).await;

    // The API key gate sits above the idempotency key gate.
    assert_status(refused, Code::Unauthenticated, Some("API_KEY_INVALID"));
}

#[tokio::test]
async fn calls_with_a_bad_idempotency_key_count_against_the_callers_rate() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.rate_limits.per_second = NonZeroU32::new(1);
    settings.rate_limits.burst = NonZeroU32::new(2).expect("two");
    let app = TestApp::spawn_with(settings).await;

    let (for_the_key, refused) = bad_keys_until_refused_otherwise(&app).await;

    // The rate gate sits above the idempotency key gate: the burst is
    // refused for its key, and then the rate refuses.
    assert!(for_the_key >= 2, "{for_the_key} refused for the key first");
    assert_status(
        Err::<(), _>(refused),
        Code::ResourceExhausted,
        Some("RATE_LIMITED"),
    );
}

#[tokio::test]
async fn calls_refused_by_a_gate_are_counted_with_their_status() {
    let db = TestDb::new(Backend::Sqlite).await;
    let app = BinaryApp::start(&db, &[("RATE_LIMIT", "1"), ("RATE_BURST", "1")]).await;

    let (_, refused) = bad_keys_until_refused_otherwise(&app).await;

    // The metrics are outermost: the refusals of the rate gate and of the
    // idempotency key gate under it are counted, each with its own code.
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let handled = |code| {
        let mut labels = rpc("tasks.v1.TaskService", "CreateTask");
        labels.push(("grpc_code", code));
        labels
    };
    scrape_until(&app.metrics, "refusals to be counted", |scrape| {
        let count = |code| value(scrape, "grpc_server_handled_total", &handled(code));
        count("ResourceExhausted") >= Some(1.0) && count("InvalidArgument") >= Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn callers_without_a_key_are_limited_by_their_own_address() {
    let db = TestDb::new(Backend::Sqlite).await;
    // The binary, whose metrics are this test's own: they show the poll
    // waiting without a call of the same caller's to look.
    let (server, metrics) =
        BinaryServer::start_with_metrics_and(&db, &[("MAX_IN_FLIGHT_PER_CALLER", "1")]).await;
    let metrics = format!("http://{metrics}/metrics");
    let app = TestApp::connect_to(server.addr());
    // A caller at 127.0.0.1 holds its one place with a long poll.
    let mut workers = WorkerServiceClient::new(app.channel.clone());
    let poll = tokio::spawn(async move {
        workers
            .lease_tasks(LeaseTasksRequest {
                worker_id: "holder".into(),
                max_tasks: 1,
                wait: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..LeaseTasksRequest::default()
            })
            .await
    });
    scrape_until(&metrics, "the long poll to wait", |scrape| {
        value(scrape, "oncely_lease_polls_waiting", &[]) == Some(1.0)
    })
    .await;
    let same = app.tasks.clone().get_task(unknown_task()).await;
    assert_status(same, Code::ResourceExhausted, Some("CALLER_BUSY"));

    let other = Endpoint::from_shared(format!("http://{}", server.addr()))
        .expect("endpoint")
        .local_address(Some(Ipv4Addr::new(127, 0, 0, 2).into()))
        .connect()
        .await
        .expect("connect from 127.0.0.2");
    let answer = TaskServiceClient::new(other).get_task(unknown_task()).await;

    // The connection gate, which finds the peer's address, sits above the
    // rate gate: the caller at 127.0.0.2 has places of its own.
    assert_status(answer, Code::NotFound, None);
    poll.abort();
}

fn unknown_task() -> GetTaskRequest {
    GetTaskRequest {
        task_id: uuid::Uuid::new_v4().to_string(),
    }
}
