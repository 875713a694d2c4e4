//! Prometheus metrics on METRICS_ADDR: after a known sequence of calls, a
//! real HTTP scrape of /metrics, read with a Prometheus text-format parser,
//! holds each counter by its name and labels. The binary runs as its own
//! process, so that its counters hold only this test's calls.

use oncely::proto::tasks_v1::{
    CompleteTaskRequest, CreateTaskRequest, LeaseTasksRequest,
    task_service_client::TaskServiceClient, worker_service_client::WorkerServiceClient,
};
use prometheus_parse::Scrape;
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};

use crate::support::{
    Backend, BinaryServer, TestDb, email_request, keyed, lease_one, new_key, request, rpc, scrape,
    scrape_until, value,
};

/// The binary on `db` with metrics on a port of their own, and their URL.
async fn start(db: &TestDb) -> (BinaryServer, String) {
    let (server, metrics) = BinaryServer::start_with_metrics(db).await;
    (server, format!("http://{metrics}/metrics"))
}

/// A channel to `server`.
async fn connect(server: &BinaryServer) -> Channel {
    Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

fn handled<'a>(method: &'a str, code: &'a str) -> Vec<(&'a str, &'a str)> {
    let service = if method == "CreateTask" {
        "tasks.v1.TaskService"
    } else {
        "tasks.v1.WorkerService"
    };
    let mut labels = rpc(service, method);
    labels.push(("grpc_code", code));
    labels
}

/// The scrape counts `calls` calls of the RPC `labels` names, both as
/// started and in the handling-time histogram.
#[track_caller]
fn assert_calls(scrape: &Scrape, labels: &[(&str, &str)], calls: f64) {
    assert_eq!(
        value(scrape, "grpc_server_started_total", labels),
        Some(calls)
    );
    assert_eq!(
        value(scrape, "grpc_server_handling_seconds", labels),
        Some(calls)
    );
}

async fn counters_follow_a_known_sequence_of_calls(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (server, url) = start(&db).await;
    // Before any call, the series are there at zero.
    let before = scrape(&url).await;
    assert_eq!(
        value(
            &before,
            "grpc_server_started_total",
            &rpc("tasks.v1.TaskService", "CreateTask")
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &before,
            "oncely_create_requests_total",
            &[("outcome", "mismatch"), ("key_source", "header")]
        ),
        Some(0.0)
    );
    assert_eq!(value(&before, "oncely_lease_grants_total", &[]), Some(0.0));

    let channel = connect(&server).await;
    let mut tasks = TaskServiceClient::new(channel.clone());
    let key = new_key();
    tasks
        .create_task(keyed(Some(&key), email_request()))
        .await
        .expect("create");
    tasks
        .create_task(keyed(Some(&key), email_request()))
        .await
        .expect("replay");
    let other = request(
        "agent-7",
        "send_email",
        serde_json::json!({"to": "bob@example.com"}),
    );
    let mismatch = tasks
        .create_task(keyed(Some(&key), other))
        .await
        .expect_err("mismatch");
    assert_eq!(mismatch.code(), Code::FailedPrecondition);
    let invalid = CreateTaskRequest {
        action: String::new(),
        ..email_request()
    };
    let invalid = tasks
        .create_task(keyed(Some(&new_key()), invalid))
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let mut workers = WorkerServiceClient::new(channel);
    let lease = lease_one(&mut workers).await;
    workers
        .complete_task(CompleteTaskRequest {
            task_id: lease.task.expect("task").task_id,
            lease_token: lease.lease_token,
            result: None,
        })
        .await
        .expect("complete");

    // The queue is read at its interval; the rest is counted as it happens.
    let after = scrape_until(&url, "the queue read", |scrape| {
        value(scrape, "oncely_tasks", &[("status", "succeeded")]) == Some(1.0)
    })
    .await;
    let create = rpc("tasks.v1.TaskService", "CreateTask");
    assert_calls(&after, &create, 4.0);
    assert_eq!(
        value(
            &after,
            "grpc_server_handled_total",
            &handled("CreateTask", "OK")
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &after,
            "grpc_server_handled_total",
            &handled("CreateTask", "FailedPrecondition")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &after,
            "grpc_server_handled_total",
            &handled("CreateTask", "InvalidArgument")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &after,
            "grpc_server_handled_total",
            &handled("LeaseTasks", "OK")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &after,
            "grpc_server_handled_total",
            &handled("CompleteTask", "OK")
        ),
        Some(1.0)
    );
    for (outcome, count) in [
        ("created", 1.0),
        ("replayed", 1.0),
        ("mismatch", 1.0),
        ("invalid", 1.0),
        ("in_progress", 0.0),
    ] {
        assert_eq!(
            value(
                &after,
                "oncely_create_requests_total",
                &[("outcome", outcome), ("key_source", "header")]
            ),
            Some(count),
            "{outcome}"
        );
    }
    assert_eq!(value(&after, "oncely_lease_grants_total", &[]), Some(1.0));
    assert_eq!(value(&after, "oncely_lease_attempt", &[]), Some(1.0));
    assert_eq!(value(&after, "oncely_lease_expiries_total", &[]), Some(0.0));
    assert_eq!(
        value(&after, "oncely_tasks", &[("status", "queued")]),
        Some(0.0)
    );
    assert!(value(&after, "oncely_db_connections", &[("state", "idle")]).is_some());
    if backend == Backend::Postgres {
        // Claims, completions and leases go to PostgreSQL in batches.
        for job in ["claims", "completions", "leases"] {
            let batches = value(&after, "oncely_group_commit_batch_size", &[("job", job)]);
            assert!(batches >= Some(1.0), "{job}: {batches:?}");
        }
    }
    // The replay and the mismatch found the key's record in the cache.
    assert_eq!(
        value(&after, "oncely_replay_cache_hits_total", &[]),
        Some(2.0)
    );
}

/// A lease that runs out is counted when its task is leased again.
async fn a_lease_that_runs_out_counts_as_an_expiry(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (server, url) = start(&db).await;
    let channel = connect(&server).await;
    TaskServiceClient::new(channel.clone())
        .create_task(keyed(Some(&new_key()), email_request()))
        .await
        .expect("create");
    let mut workers = WorkerServiceClient::new(channel);
    let lease = || LeaseTasksRequest {
        worker_id: "worker-1".into(),
        lease_duration: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        // The second poll waits for the first lease to run out (a second,
        // and the next read of the queue): far less than this.
        wait: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..LeaseTasksRequest::default()
    };
    let first = workers.lease_tasks(lease()).await.expect("lease");
    assert_eq!(first.get_ref().leases.len(), 1);

    // Not completed: after a second it is leased again, as attempt 2.
    let again = workers.lease_tasks(lease()).await.expect("lease again");
    assert_eq!(again.get_ref().leases.len(), 1);

    let scrape = scrape(&url).await;
    assert_eq!(value(&scrape, "oncely_lease_grants_total", &[]), Some(2.0));
    assert_eq!(
        value(&scrape, "oncely_lease_expiries_total", &[]),
        Some(1.0)
    );
    assert_eq!(value(&scrape, "oncely_lease_attempt", &[]), Some(2.0));
}

/// A call the client gives up on before its answer (here a long poll) is
/// counted as handled, `Canceled`, and calls to paths the server does not
/// have make no series.
async fn a_call_given_up_counts_as_canceled(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (server, url) = start(&db).await;
    let channel = connect(&server).await;
    let mut workers = WorkerServiceClient::new(channel.clone());
    let poll = tokio::spawn(async move {
        workers
            .lease_tasks(LeaseTasksRequest {
                worker_id: "worker-1".into(),
                wait: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                ..LeaseTasksRequest::default()
            })
            .await
    });
    // Given up once the server holds it, waiting for a task.
    scrape_until(&url, "the poll to wait for a task", |scrape| {
        value(scrape, "oncely_lease_polls_waiting", &[]) == Some(1.0)
    })
    .await;
    assert!(
        !poll.is_finished(),
        "the poll answered with nothing to lease"
    );
    poll.abort();
    let made_up = crate::support::raw_unary(
        channel,
        "/scanner.Probe/Random",
        tonic::Request::new(Vec::new()),
    )
    .await;
    assert!(made_up.is_err());

    let lease = rpc("tasks.v1.WorkerService", "LeaseTasks");
    let canceled = handled("LeaseTasks", "Canceled");
    let scrape = scrape_until(&url, "the poll counted", |scrape| {
        value(scrape, "grpc_server_handled_total", &canceled) == Some(1.0)
    })
    .await;
    assert_calls(&scrape, &lease, 1.0);
    assert!(
        !scrape
            .samples
            .iter()
            .any(|s| s.labels.get("grpc_service") == Some("scanner.Probe")),
        "a made-up path made a series"
    );
}

conformance!(
    a_call_given_up_counts_as_canceled,
    counters_follow_a_known_sequence_of_calls,
    a_lease_that_runs_out_counts_as_an_expiry,
);
