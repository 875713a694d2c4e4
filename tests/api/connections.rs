//! What a connection may hold and for how long: idle and never-sending
//! connections are closed, a slowloris preface does not keep its socket, a
//! peer that never reads its answers loses its connection (and the places
//! its calls held), and one caller cannot take every in-flight place.

use std::{sync::atomic::Ordering, time::Duration};

use oncely::proto::tasks_v1::{
    GetTaskRequest, LeaseTasksRequest, ListTasksRequest, worker_service_client::WorkerServiceClient,
};
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, Request};
use tonic_types::StatusExt;

use serde_json::json;

use crate::support::{
    Backend, BinaryServer, DroppingProxy, TestApp, TestDb, assert_status, eventually, keyed,
    new_key, raw_h2, request, scrape_until, test_settings, value,
};

/// The longest a test waits for the server to act; it acts much sooner.
const PATIENCE: Duration = Duration::from_secs(20);

/// Reads until the peer closes the socket; true if it did within PATIENCE.
async fn closed_by_server(socket: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(PATIENCE, read_all).await.is_ok()
}

async fn a_connection_that_never_sends_a_call_is_closed_and_others_are_served(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.connection.idle_timeout = Duration::from_millis(500);
    let app = TestApp::spawn_with(settings).await;

    let mut silent = TcpStream::connect(app.addr).await.expect("connect");
    let mut slow = TcpStream::connect(app.addr).await.expect("connect");
    // A slowloris: the HTTP/2 preface, one byte at a time.
    let dribble = tokio::spawn(async move {
        for byte in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
            if slow.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        closed_by_server(&mut slow).await
    });

    assert!(
        closed_by_server(&mut silent).await,
        "the silent socket stays open"
    );
    assert!(
        dribble.await.expect("join"),
        "the slowloris socket stays open"
    );
    app.health("").await.expect("others are served");
}

async fn a_client_idle_past_the_timeout_calls_again_without_noticing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.connection.idle_timeout = Duration::from_millis(300);
    let app = TestApp::spawn_with(settings).await;
    // The client's connections go through a proxy that counts them.
    let proxy = DroppingProxy::start(app.addr, 0).await;
    let client = TestApp::connect_to(proxy.addr);
    let created = client.create_email().await;

    eventually(
        PATIENCE,
        "the server to close the idle connection",
        || async { (proxy.closed.load(Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;

    let task = client.task(&created.task_id).await;
    assert_eq!(task.task_id, created.task_id);
    assert!(
        proxy.opened.load(Ordering::SeqCst) >= 2,
        "the channel reconnected by itself"
    );
}

/// A gRPC message frame around `message`.
fn grpc_frame(message: &impl Message) -> bytes::Bytes {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(body.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&body);
    frame.into()
}

/// A raw HTTP/2 client that opens no flow-control window (the server can
/// send headers but never an answer's bytes) and sends `calls` calls of
/// `method` with `message`. Returns the task driving the connection (it
/// ends when the connection closes) and the calls' answers.
async fn never_reading(
    app: &TestApp,
    method: &str,
    message: &impl Message,
    calls: usize,
) -> (
    tokio::task::JoinHandle<Result<(), h2::Error>>,
    Vec<h2::client::ResponseFuture>,
) {
    let socket = TcpStream::connect(app.addr).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(socket)
        .await
        .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let mut answers = Vec::new();
    for _ in 0..calls {
        let request =
            http::Request::post(format!("http://{}/tasks.v1.TaskService/{method}", app.addr))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .expect("request");
        let (answer, mut body) = client.send_request(request, false).expect("send");
        body.send_data(grpc_frame(message), true).expect("body");
        answers.push(answer);
        client = client.ready().await.expect("ready");
    }
    (connection, answers)
}

async fn a_peer_that_never_reads_its_answers_loses_its_connection_and_its_places(backend: Backend) {
    const STUCK: usize = 8;
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    // Long enough that the stuck calls surely still hold their places
    // when the test checks, however slow the machine.
    settings.connection.call_limit = Duration::from_secs(5);
    settings.rate_limits.max_in_flight = STUCK;
    let app = TestApp::spawn_with(settings).await;
    app.create_email().await;

    let (connection, answers) = never_reading(
        &app,
        "ListTasks",
        &ListTasksRequest {
            agent_id: "agent-7".into(),
            ..Default::default()
        },
        STUCK,
    )
    .await;
    // Each answer's headers arrive (they need no window), its body never.
    let mut bodies = Vec::new();
    for answer in answers {
        let response = answer.await.expect("the answer's headers");
        assert!(
            response.headers().get("grpc-status").is_none(),
            "an answer that is not stuck: {response:?}"
        );
        bodies.push(response.into_body());
    }
    let call = Request::new(GetTaskRequest {
        task_id: uuid::Uuid::new_v4().to_string(),
    });
    let full = app.tasks.clone().get_task(call).await;
    let full = assert_status(full, Code::ResourceExhausted, Some("OVERLOADED"));
    assert!(full.get_details_retry_info().is_some());

    let closed = tokio::time::timeout(PATIENCE, connection).await;
    assert!(closed.is_ok(), "the never-reading connection stays open");
    for mut body in bodies {
        assert!(body.data().await.is_none_or(|chunk| chunk.is_err()));
    }
    let task = app.create_email().await;
    assert_eq!(
        app.task(&task.task_id).await.task_id,
        task.task_id,
        "the places are free again"
    );
}

async fn one_callers_long_polls_cannot_take_every_place(backend: Backend) {
    let db = TestDb::new(backend).await;
    let busy = crate::auth::create_key(&db, "busy", "admin", &[]);
    let calm = crate::auth::create_key(&db, "calm", "admin", &[]);
    // The binary, whose metrics are this test's own: they show the polls
    // waiting without taking a place of the caller's to look.
    let (server, metrics) =
        BinaryServer::start_with_metrics_and(&db, &[("MAX_IN_FLIGHT_PER_CALLER", "2")]).await;
    let metrics = format!("http://{metrics}/metrics");
    let app = TestApp::connect_to(server.addr());
    // A poll of `token`'s for one task, waiting up to `wait` seconds.
    let long_poll = |token: &str, wait: i64| {
        let mut workers = WorkerServiceClient::new(app.channel.clone());
        let call = crate::auth::with_token(
            token,
            Request::new(LeaseTasksRequest {
                worker_id: "w".into(),
                max_tasks: 1,
                wait: Some(prost_types::Duration {
                    seconds: wait,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        );
        tokio::spawn(async move { workers.lease_tasks(call).await.map(drop) })
    };
    // The polls wait far longer than the test takes; tasks end them.
    let polls = [long_poll(&busy, 60), long_poll(&busy, 60)];
    scrape_until(&metrics, "the caller's two polls to wait", |scrape| {
        value(scrape, "oncely_lease_polls_waiting", &[]) == Some(2.0)
    })
    .await;

    let third = long_poll(&busy, 60).await.expect("join");
    let other = long_poll(&calm, 60);

    let status = assert_status(third, Code::ResourceExhausted, Some("CALLER_BUSY"));
    assert!(status.get_details_retry_info().is_some());
    assert!(status.message().contains("2 calls open"), "{status:?}");
    for _ in 0..3 {
        let call = crate::auth::with_token(
            &calm,
            keyed(
                Some(&new_key()),
                request("agent-7", "send_email", json!({})),
            ),
        );
        app.tasks
            .clone()
            .create_task(call)
            .await
            .expect("a task for each poll");
    }
    other
        .await
        .expect("join")
        .expect("another caller has places of its own");
    for poll in polls {
        poll.await.expect("join").expect("the open calls finish");
    }
    eventually(PATIENCE, "a poll served once its calls end", || async {
        long_poll(&busy, 0).await.expect("join").ok()
    })
    .await;
}

async fn answers_held_for_a_peer_that_never_reads_are_bounded_in_bytes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.rate_limits.max_answer_bytes = 150 * 1024;
    // Long enough that the unread answers surely still hold their bytes
    // when the test checks, however slow the machine.
    settings.connection.call_limit = Duration::from_secs(5);
    let app = TestApp::spawn_with(settings).await;
    let big = app
        .create(
            Some(&new_key()),
            request("agent-7", "upload", json!({"body": "x".repeat(60 * 1024)})),
        )
        .await
        .expect("create")
        .into_inner();
    let small = app.create_email().await;
    let get = |task_id: &str| {
        let mut tasks = app.tasks.clone();
        let call = Request::new(GetTaskRequest {
            task_id: task_id.to_owned(),
        });
        async move { tasks.get_task(call).await.map(|r| r.into_inner()) }
    };

    // Two unread answers of 60 KiB hold 120 of the 150 KiB.
    let (connection, answers) = never_reading(
        &app,
        "GetTask",
        &GetTaskRequest {
            task_id: big.task_id.clone(),
        },
        2,
    )
    .await;
    let mut bodies = Vec::new();
    for answer in answers {
        let response = answer.await.expect("the answer's headers");
        assert!(response.headers().get("grpc-status").is_none());
        bodies.push(response.into_body());
    }

    let refused = get(&big.task_id).await;

    assert_status(refused, Code::ResourceExhausted, Some("OVERLOADED"));
    get(&small.task_id)
        .await
        .expect("a small answer still fits");

    let closed = tokio::time::timeout(PATIENCE, connection).await;
    assert!(closed.is_ok(), "the never-reading connection stays open");
    assert_eq!(
        get(&big.task_id)
            .await
            .expect("the bytes are free again")
            .task_id,
        big.task_id
    );
}

async fn a_connection_may_open_at_most_128_calls_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let (mut client, driver) = raw_h2(app.addr).await;
    let request = http::Request::post(format!("http://{}/grpc.health.v1.Health/Check", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (answer, mut body) = client.send_request(request, false).expect("send");
    body.send_data(
        grpc_frame(&tonic_health::pb::HealthCheckRequest::default()),
        true,
    )
    .expect("body");
    // Once answered, the client has the server's settings.
    answer.await.expect("an answer");

    assert_eq!(client.current_max_send_streams(), 128);
    driver.abort();
}

/// A client that gives up on every call it has open at once (a burst of
/// RST_STREAMs, as a cancelled batch of calls sends) keeps its connection:
/// the server refuses a flood of resets only past what a connection may
/// have open.
async fn a_burst_of_cancelled_calls_keeps_the_connection(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let (mut client, driver) = raw_h2(app.addr).await;
    let check = || {
        http::Request::post(format!("http://{}/grpc.health.v1.Health/Check", app.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request")
    };

    // 100 calls opened and reset before the server could take them.
    for _ in 0..100 {
        client = client.ready().await.expect("room for a call");
        let (_, mut body) = client.send_request(check(), false).expect("send");
        body.send_reset(h2::Reason::CANCEL);
    }
    client = client.ready().await.expect("room for a call");
    let (answer, mut body) = client.send_request(check(), false).expect("send");
    body.send_data(
        grpc_frame(&tonic_health::pb::HealthCheckRequest::default()),
        true,
    )
    .expect("body");

    let answer = answer.await.expect("the connection still serves");
    assert_eq!(answer.status(), http::StatusCode::OK);
    driver.abort();
}

async fn a_request_body_that_never_finishes_is_cut_and_frees_its_place(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.request_timeout = Duration::from_secs(1);
    settings.rate_limits.max_in_flight = 1;
    let app = TestApp::spawn_with(settings).await;
    let (mut client, driver) = raw_h2(app.addr).await;
    let request = http::Request::post(format!(
        "http://{}/tasks.v1.TaskService/ListTasks",
        app.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("request");
    let (answer, mut body) = client.send_request(request, false).expect("send");
    // A frame that announces 1,000 bytes and brings 10, then nothing.
    let mut partial = vec![0u8];
    partial.extend_from_slice(&1000u32.to_be_bytes());
    partial.extend_from_slice(&[0; 10]);
    body.send_data(partial.into(), false)
        .expect("part of a body");

    let response = tokio::time::timeout(PATIENCE, answer)
        .await
        .expect("an answer within the request timeout")
        .expect("an answer");
    let status = response
        .headers()
        .get("grpc-status")
        .and_then(|code| code.to_str().ok())
        .map(str::to_owned);

    assert_eq!(
        status.as_deref(),
        Some("4"),
        "DEADLINE_EXCEEDED: {response:?}"
    );
    let task = app.create_email().await;
    assert_eq!(
        app.task(&task.task_id).await.task_id,
        task.task_id,
        "its place is free again"
    );
    driver.abort();
}

async fn a_health_watch_has_a_limit_of_its_own(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.connection.stream_limit = Duration::from_secs(1);
    let app = TestApp::spawn_with(settings).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("watch")
        .into_inner();
    watch.message().await.expect("the first status");

    let ended = tokio::time::timeout(PATIENCE, watch.message()).await;

    let ended = ended.expect("the watch ends once past its limit");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    app.health("").await.expect("others are served");
}

conformance!(
    a_burst_of_cancelled_calls_keeps_the_connection,
    a_health_watch_has_a_limit_of_its_own,
    a_connection_may_open_at_most_128_calls_at_once,
    a_request_body_that_never_finishes_is_cut_and_frees_its_place,
    a_connection_that_never_sends_a_call_is_closed_and_others_are_served,
    a_client_idle_past_the_timeout_calls_again_without_noticing,
    a_peer_that_never_reads_its_answers_loses_its_connection_and_its_places,
    one_callers_long_polls_cannot_take_every_place,
    answers_held_for_a_peer_that_never_reads_are_bounded_in_bytes,
);
