//! What hostile requests and connections cost the server: each costly
//! payload shape (its answer, how long it took, the slowest health check
//! meanwhile, the server's memory after), then peers that never read their
//! answers and sockets that never send, against the real release binary on
//! each store.
//!
//! ```sh
//! cargo bench --bench hostile
//! BENCH_STORES=sqlite cargo bench --bench hostile
//! ```
//!
//! Results go to standard output and are recorded in BENCHMARKS.md. The
//! tests check that each shape gets the right error and that the server
//! closes such connections; this only reports what they cost.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use oncely::proto::tasks_v1::{
    CreateTaskRequest, ListTasksRequest, task_service_client::TaskServiceClient,
};
use prost::Message;
use prost_types::{ListValue, Struct, Value, value::Kind};
use tokio::net::TcpStream;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use common::Server;

/// Never-reading connections, each with the most streams a connection may
/// open.
const STUCK_CONNECTIONS: usize = 4;
const STREAMS_PER_CONNECTION: usize = 128;
/// Sockets that connect and send nothing.
const SILENT_SOCKETS: usize = 2000;

#[tokio::main]
async fn main() {
    for store in common::stores() {
        match store.as_str() {
            "sqlite" => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                run("sqlite", &url).await;
            }
            "postgres" => {
                let db = common::PgDatabase::create().await;
                run("postgres", &db.url).await;
                db.drop_now().await;
            }
            other => panic!("unknown store {other}; BENCH_STORES takes sqlite and postgres"),
        }
    }
}

async fn run(store: &str, url: &str) {
    let server = Server::start(
        url,
        &[("REQUEST_TIMEOUT", "5s"), ("CONNECTION_IDLE_TIMEOUT", "5s")],
    )
    .await;
    println!(
        "\n{store}: server started, {:.1} MiB resident",
        server.rss_mib()
    );
    println!(
        "{:<34} {:>9} {:>18} {:>11} {:>16} {:>10}",
        "payload", "bytes", "answer", "took ms", "worst health ms", "RSS MiB"
    );
    for (name, body) in payloads() {
        let size = body.len();
        let watch = HealthWatch::start(&server);
        let started = Instant::now();
        let code = raw_create(&server.addr, body).await;
        let took = started.elapsed();
        let worst = watch.stop().await;
        println!(
            "{name:<34} {size:>9} {code:>18} {:>11.1} {worst:>16.1} {:>10.1}",
            took.as_secs_f64() * 1000.0,
            server.rss_mib()
        );
    }
    never_reading(&server).await;
    silent_sockets(&server).await;
}

/// A CreateTask request, encoded, with `parameters`.
fn create(parameters: Struct) -> Vec<u8> {
    CreateTaskRequest {
        agent_id: "hostile".into(),
        action: "probe".into(),
        parameters: Some(parameters),
    }
    .encode_to_vec()
}

fn value(kind: Kind) -> Value {
    Value { kind: Some(kind) }
}

fn one_member(name: String, member: Value) -> Struct {
    Struct {
        fields: [(name, member)].into_iter().collect(),
    }
}

/// The shapes that once cost far more than their size; the two whose cost
/// grows with their size (a long name holding a long list, many members)
/// also at a quarter and a half of it, to show the time stays linear.
fn payloads() -> Vec<(String, Vec<u8>)> {
    let nulls = |count: usize| {
        value(Kind::ListValue(ListValue {
            values: vec![value(Kind::NullValue(0)); count],
        }))
    };
    let mut deep = value(Kind::NullValue(0));
    for _ in 0..200 {
        deep = value(Kind::ListValue(ListValue { values: vec![deep] }));
    }
    let wide = |count: i32| Struct {
        fields: (0..count)
            .map(|i| (format!("k{i}"), value(Kind::NumberValue(f64::from(i)))))
            .collect(),
    };
    let mut scaled = Vec::new();
    for quarters in [1, 2] {
        scaled.push((
            format!("{quarters}/4 of the name and nulls"),
            create(one_member(
                "n".repeat((2 << 20) * quarters / 4),
                nulls(300_000 * quarters / 4),
            )),
        ));
        scaled.push((
            format!("{} members", 100_000 * quarters / 4),
            create(wide(100_000 * quarters as i32 / 4)),
        ));
    }
    let fixed: Vec<(&str, Vec<u8>)> = vec![
        (
            "2 MiB name holding 300,000 nulls",
            create(one_member("n".repeat(2 << 20), nulls(300_000))),
        ),
        ("100,000 members", create(wide(100_000))),
        ("nesting 200 deep", create(one_member("d".into(), deep))),
        (
            "3 MiB string",
            create(one_member(
                "s".into(),
                value(Kind::StringValue("x".repeat(3 << 20))),
            )),
        ),
        (
            "1 MiB of control characters",
            create(one_member(
                "\u{1}".repeat(1 << 20),
                value(Kind::NumberValue(1.0)),
            )),
        ),
        ("1 MiB undecodable", vec![0xff; 1 << 20]),
        (
            "5 MiB (over the limit)",
            create(one_member(
                "s".into(),
                value(Kind::StringValue("x".repeat(5 << 20))),
            )),
        ),
    ];
    scaled
        .into_iter()
        .chain(
            fixed
                .into_iter()
                .map(|(name, body)| (name.to_owned(), body)),
        )
        .collect()
}

/// A gRPC message frame around `body`.
fn frame(body: &[u8]) -> bytes::Bytes {
    let mut framed = Vec::with_capacity(body.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(body);
    framed.into()
}

/// A raw HTTP/2 connection to the server, and the task driving it (it ends
/// when the connection closes).
async fn connect(
    addr: &str,
    window: Option<u32>,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let socket = TcpStream::connect(addr).await.expect("connect");
    let _ = socket.set_nodelay(true);
    let mut builder = h2::client::Builder::new();
    if let Some(window) = window {
        builder.initial_window_size(window);
    }
    let (client, connection) = builder.handshake(socket).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    (client.ready().await.expect("ready"), driver)
}

fn grpc_request(addr: &str, path: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("idempotency-key", uuid::Uuid::new_v4().to_string())
        .body(())
        .expect("request")
}

/// Sends `body` as a CreateTask and returns the gRPC status it got.
async fn raw_create(addr: &str, body: Vec<u8>) -> String {
    let (mut client, _driver) = connect(addr, None).await;
    let (answer, mut send) = client
        .send_request(
            grpc_request(addr, "/tasks.v1.TaskService/CreateTask"),
            false,
        )
        .expect("send");
    // A refusal may come before the whole body is sent.
    let _ = send.send_data(frame(&body), true);
    let response = match answer.await {
        Ok(response) => response,
        Err(error) => return format!("reset: {error}"),
    };
    if let Some(code) = response.headers().get("grpc-status") {
        return code_name(code.to_str().unwrap_or("?"));
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        if chunk.is_err() {
            break;
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => trailers.get("grpc-status").map_or_else(
            || "no status".into(),
            |c| code_name(c.to_str().unwrap_or("?")),
        ),
        _ => "no trailers".into(),
    }
}

fn code_name(number: &str) -> String {
    number
        .parse::<i32>()
        .map(|n| format!("{:?}", tonic::Code::from(n)))
        .unwrap_or_else(|_| number.to_owned())
}

/// Health checks every 20 ms on a connection of their own; the slowest.
struct HealthWatch {
    stop: Arc<AtomicBool>,
    worst_us: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthWatch {
    fn start(server: &Server) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let worst_us = Arc::new(AtomicU64::new(0));
        let mut health = HealthClient::new(server.channel());
        let task = tokio::spawn({
            let stop = stop.clone();
            let worst_us = worst_us.clone();
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let answered = tokio::time::timeout(
                        Duration::from_secs(30),
                        health.check(HealthCheckRequest::default()),
                    )
                    .await;
                    let took = started.elapsed().as_micros() as u64;
                    let took = if matches!(answered, Ok(Ok(_))) {
                        took
                    } else {
                        u64::MAX
                    };
                    worst_us.fetch_max(took, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        Self {
            stop,
            worst_us,
            task,
        }
    }

    /// The slowest check in milliseconds (infinite if one failed).
    async fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        match self.worst_us.load(Ordering::Relaxed) {
            u64::MAX => f64::INFINITY,
            us => us as f64 / 1000.0,
        }
    }
}

/// Connections that open every stream they may for large ListTasks pages
/// and never read a byte of the answers.
async fn never_reading(server: &Server) {
    let mut tasks = TaskServiceClient::new(server.channel());
    let big = value(Kind::StringValue("x".repeat(60 * 1024)));
    for _ in 0..40 {
        let mut request = tonic::Request::new(CreateTaskRequest {
            agent_id: "big".into(),
            action: "probe".into(),
            parameters: Some(one_member("body".into(), big.clone())),
        });
        request.metadata_mut().insert(
            "idempotency-key",
            uuid::Uuid::new_v4().to_string().parse().expect("key"),
        );
        tasks
            .create_task(request)
            .await
            .expect("create a large task");
    }
    let before = server.rss_mib();
    let watch = HealthWatch::start(server);
    let started = Instant::now();
    let mut connections = Vec::new();
    for _ in 0..STUCK_CONNECTIONS {
        let (mut client, driver) = connect(&server.addr, Some(0)).await;
        let mut answers = Vec::new();
        for _ in 0..STREAMS_PER_CONNECTION {
            let Ok((answer, mut send)) = client.send_request(
                grpc_request(&server.addr, "/tasks.v1.TaskService/ListTasks"),
                false,
            ) else {
                break;
            };
            let _ = send.send_data(
                frame(
                    &ListTasksRequest {
                        agent_id: "big".into(),
                        page_size: 100,
                        page_token: String::new(),
                    }
                    .encode_to_vec(),
                ),
                true,
            );
            answers.push(answer);
            match client.ready().await {
                Ok(ready) => client = ready,
                Err(_) => break,
            }
        }
        connections.push((driver, answers));
    }
    let mut peak: f64 = 0.0;
    let mut closed_after = None;
    for _ in 0..1200 {
        peak = peak.max(server.rss_mib());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let open = connections
            .iter()
            .filter(|(driver, _)| !driver.is_finished())
            .count();
        if open == 0 {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let worst = watch.stop().await;
    println!(
        "never-reading peers: {STUCK_CONNECTIONS} connections x {STREAMS_PER_CONNECTION} ListTasks pages of ~2 MiB; RSS {before:.1} MiB before, {peak:.1} MiB at peak, {:.1} MiB after; connections closed after {}; worst health check {worst:.1} ms",
        server.rss_mib(),
        closed_after.map_or_else(
            || "more than 60 s".into(),
            |d| format!("{:.1} s", d.as_secs_f64())
        ),
    );
}

/// Sockets that connect and never send: how much they cost, and when the
/// server closes them.
async fn silent_sockets(server: &Server) {
    use tokio::io::AsyncReadExt;
    let before = server.rss_mib();
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(SILENT_SOCKETS);
    for _ in 0..SILENT_SOCKETS {
        match TcpStream::connect(&server.addr).await {
            Ok(socket) => sockets.push(socket),
            Err(error) => {
                println!("connect failed after {} sockets: {error}", sockets.len());
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let holding = server.rss_mib();
    let reads = sockets.into_iter().map(|mut socket| {
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return Instant::now(),
                    Ok(_) => continue,
                }
            }
        })
    });
    let mut last = started;
    let mut closed = 0;
    for read in reads.collect::<Vec<_>>() {
        if let Ok(Ok(at)) = tokio::time::timeout(Duration::from_secs(60), read).await {
            closed += 1;
            last = last.max(at);
        }
    }
    println!(
        "silent sockets: {SILENT_SOCKETS} opened; RSS {before:.1} MiB before, {holding:.1} MiB holding them; {closed} closed by the server, the last {:.1} s after the first opened",
        (last - started).as_secs_f64()
    );
}
