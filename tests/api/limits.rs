//! Rate limits per caller and the in-flight bound: RESOURCE_EXHAUSTED with
//! RetryInfo, and recovery.

use std::{
    num::NonZeroU32,
    time::{Duration, Instant},
};

use oncely::proto::tasks_v1::{
    GetTaskRequest, LeaseTasksRequest, worker_service_client::WorkerServiceClient,
};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::support::{
    Backend, BinaryApp, TestApp, TestDb, assert_status, eventually, raw_h2, scrape_until,
    test_settings, value,
};

async fn get_unknown(app: &TestApp) -> Result<(), Status> {
    let call = Request::new(GetTaskRequest {
        task_id: uuid::Uuid::new_v4().to_string(),
    });
    match app.tasks.clone().get_task(call).await {
        Err(status) if status.code() == Code::NotFound => Ok(()),
        Err(status) => Err(status),
        Ok(_) => Ok(()),
    }
}

/// Makes calls with `call` until one is refused as RESOURCE_EXHAUSTED (at
/// most 100): how many were served first, and the refusal. However slowly
/// the calls go, a rate of a call a second refuses one long before 100.
async fn until_limited<Fut>(mut call: impl FnMut() -> Fut) -> (u32, Status)
where
    Fut: Future<Output = Result<(), Status>>,
{
    let mut served = 0;
    for _ in 0..100 {
        match call().await {
            Ok(()) => served += 1,
            Err(status) if status.code() == Code::ResourceExhausted => return (served, status),
            Err(status) => panic!("after {served} calls served: {status:?}"),
        }
    }
    panic!("100 calls in a row were served")
}

async fn a_caller_over_its_rate_is_told_when_to_come_back(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.rate_limits.per_second = NonZeroU32::new(1);
    settings.rate_limits.burst = NonZeroU32::new(2).expect("two");
    let app = TestApp::spawn_with(settings).await;
    let started = Instant::now();

    let (served, refused) = until_limited(|| get_unknown(&app)).await;

    // The burst is served; past it, at most a call for each second the
    // calls took (however long that was), and then one is refused.
    let took = started.elapsed().as_secs_f64();
    assert!(served >= 2, "{served} calls served");
    assert!(
        f64::from(served) <= 2.0 + took + 1.0,
        "{served} in {took} s"
    );
    let status = assert_status(
        Err::<(), _>(refused),
        Code::ResourceExhausted,
        Some("RATE_LIMITED"),
    );
    let delay = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
    tokio::time::sleep(delay + Duration::from_millis(50)).await;
    get_unknown(&app)
        .await
        .expect("served again after the delay");
    app.health("").await.expect("health is never limited");
}

async fn calls_past_the_in_flight_bound_are_shed_not_queued(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The binary, whose metrics show the long poll in the server's hands
    // (a probing call would itself take the one place).
    let app = BinaryApp::start(&db, &[("MAX_IN_FLIGHT", "1")]).await;
    let mut workers = WorkerServiceClient::new(app.channel.clone());
    let long_poll = tokio::spawn(async move {
        workers
            .lease_tasks(LeaseTasksRequest {
                worker_id: "w".into(),
                wait: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
    });
    scrape_until(&app.metrics, "the long poll to wait for a task", |scrape| {
        value(scrape, "oncely_lease_polls_waiting", &[]) == Some(1.0)
    })
    .await;

    let shed = get_unknown(&app).await;

    let status = assert_status(shed, Code::ResourceExhausted, Some("OVERLOADED"));
    assert!(status.get_details_retry_info().is_some());
    app.health("").await.expect("health is never shed");
    // A task no instance is told of: the poll finds it at its next read.
    db.insert_tasks("agent-7", 1).await;
    let leased = long_poll
        .await
        .expect("join")
        .expect("the call in flight finishes");
    assert_eq!(leased.into_inner().leases.len(), 1);
    // The place is given back as the answer goes out: maybe a moment after
    // the client has it.
    eventually(
        Duration::from_secs(30),
        "a call served once the place is free",
        || async { get_unknown(&app).await.ok() },
    )
    .await;
}

async fn each_api_key_has_a_bucket_of_its_own(backend: Backend) {
    let db = TestDb::new(backend).await;
    let busy = crate::auth::create_key(&db, "busy", "admin", &[]);
    let calm = crate::auth::create_key(&db, "calm", "admin", &[]);
    let mut settings = test_settings(&db.url);
    settings.rate_limits.per_second = NonZeroU32::new(1);
    settings.rate_limits.burst = NonZeroU32::new(1).expect("one");
    let app = TestApp::spawn_with(settings).await;
    let get = |token: &str| {
        let mut tasks = app.tasks.clone();
        let call = crate::auth::with_token(
            token,
            Request::new(GetTaskRequest {
                task_id: uuid::Uuid::new_v4().to_string(),
            }),
        );
        // Served: the task is not found.
        async move {
            match tasks.get_task(call).await {
                Err(status) if status.code() == Code::NotFound => Ok(()),
                answer => answer.map(drop),
            }
        }
    };

    let (served, refused) = until_limited(|| get(&busy)).await;
    let other = get(&calm).await;

    assert!(served >= 1, "the first call is served");
    assert_status(
        Err::<(), _>(refused),
        Code::ResourceExhausted,
        Some("RATE_LIMITED"),
    );
    other.expect("its own bucket");
}

async fn the_client_waits_out_a_rate_limit_as_retry_info_asks(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.rate_limits.per_second = NonZeroU32::new(1);
    settings.rate_limits.burst = NonZeroU32::new(1).expect("one");
    let app = TestApp::spawn_with(settings).await;
    let client =
        oncely_client::OncelyClient::connect(format!("http://{}", app.addr)).expect("address");

    // Calls until one meets the limit: however slowly they go, one does
    // long before twenty.
    let mut attempts = Vec::new();
    while attempts.last().is_none_or(|&made| made < 2) && attempts.len() < 20 {
        let created = client
            .create_task(crate::support::email_request())
            .await
            .expect("created, after waiting out the limit if it met it");
        attempts.push(created.attempts);
    }

    assert_eq!(attempts[0], 1, "{attempts:?}");
    assert!(
        attempts.last() >= Some(&2),
        "no call met the limit: {attempts:?}"
    );
    assert_eq!(db.count("tasks").await, attempts.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statement_past_the_statement_timeout_is_cancelled_by_the_database() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut settings = test_settings(&db.url);
    settings.database.in_flight_wait = Duration::from_secs(60);
    settings.database.statement_timeout = Duration::from_secs(1);
    let app = TestApp::spawn_with(settings).await;
    let lock = db.lock_tasks_table().await;
    let mut call = Request::new(GetTaskRequest {
        task_id: uuid::Uuid::new_v4().to_string(),
    });
    call.set_timeout(Duration::from_secs(20));

    let answer = app.tasks.clone().get_task(call).await;

    // Without the statement timeout the lock wait (60 s) would outlast the
    // caller's 20 s deadline.
    assert_status(answer, Code::Unavailable, Some("DATABASE_UNAVAILABLE"));
    lock.rollback().await.expect("rollback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_request_timeout_bounds_every_call_and_long_polls_answer_before_it() {
    // Long enough that the server keeps back its full second for a long
    // poll's answer to arrive.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.request_timeout = REQUEST_TIMEOUT;
    settings.queue.request_timeout = REQUEST_TIMEOUT;
    settings.database.in_flight_wait = Duration::from_secs(60);
    let app = TestApp::spawn_with(settings).await;
    let created = app
        .create(
            Some(&crate::support::new_key()),
            crate::support::email_request(),
        )
        .await
        .expect("create")
        .into_inner();
    let lock = db.hold_writes().await;

    let mut stuck = crate::support::keyed(
        Some(&crate::support::new_key()),
        crate::support::email_request(),
    );
    stuck.set_timeout(Duration::from_secs(30));
    let wait = oncely::proto::tasks_v1::WaitTaskRequest {
        task_id: created.task_id,
        timeout: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
    };
    let (mut writer, mut waiter) = (app.tasks.clone(), app.tasks.clone());
    let (cut, waited) = tokio::join!(writer.create_task(stuck), waiter.wait_task(wait));
    lock.rollback().await;

    // Without the server's timeout the write would wait for the caller's
    // 30 s deadline, and the wait for its own 60 s.
    let status = cut.expect_err("cut by the request timeout");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("request timeout of 10s"),
        "{status:?}"
    );
    let task = waited.expect("a long poll answers before the request timeout");
    assert_eq!(
        task.into_inner().status(),
        oncely::proto::tasks_v1::TaskStatus::Queued
    );
}

async fn oversized_metadata_is_refused_and_the_server_keeps_serving(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let mut call = Request::new(GetTaskRequest {
        task_id: uuid::Uuid::new_v4().to_string(),
    });
    let huge: tonic::metadata::MetadataValue<_> = "x".repeat(32 * 1024).parse().expect("metadata");
    call.metadata_mut().insert("x-padding", huge);

    let refused = app.tasks.clone().get_task(call).await;
    // The same on a raw connection, which does not check the server's
    // limit itself: the refusal comes from the server.
    let (mut client, driver) = raw_h2(app.addr).await;
    let raw = http::Request::post(format!("http://{}/tasks.v1.TaskService/GetTask", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-padding", "x".repeat(32 * 1024))
        .body(())
        .expect("request");
    let answer = match client.send_request(raw, true) {
        Ok((answer, _)) => answer.await.map(|r| r.status()),
        Err(error) => Err(error),
    };

    let status = refused.expect_err("a 32 KiB header block is refused");
    assert_ne!(
        status.code(),
        Code::NotFound,
        "the call reached the service"
    );
    match answer {
        Ok(status) => assert_eq!(status, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(error) => assert!(error.is_remote() || error.is_reset(), "{error:?}"),
    }
    get_unknown(&app).await.expect("still serving");
    driver.abort();
}

conformance!(
    a_caller_over_its_rate_is_told_when_to_come_back,
    calls_past_the_in_flight_bound_are_shed_not_queued,
    each_api_key_has_a_bucket_of_its_own,
    the_client_waits_out_a_rate_limit_as_retry_info_asks,
    oversized_metadata_is_refused_and_the_server_keeps_serving,
);
