//! The task lifecycle under load: how many tasks 8 workers lease and
//! complete per second, on each store, against the real server binary
//! (release build) over gRPC on loopback.
//!
//! ```sh
//! cargo bench --bench lifecycle                 # 5,000 tasks per store
//! BENCH_TASKS=20000 cargo bench --bench lifecycle
//! ```
//!
//! PostgreSQL is reached at `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the benchmark makes a
//! database of its own there and drops it. Results go to standard output;
//! they are recorded in BENCHMARKS.md. Nothing here is a test: timings are
//! reported, never asserted.

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use oncely::proto::tasks_v1::{
    CompleteTaskRequest, CreateTaskRequest, LeaseTasksRequest,
    task_service_client::TaskServiceClient, worker_service_client::WorkerServiceClient,
};
use sqlx::Connection;
use tonic::{Request, transport::Channel};

const WORKERS: usize = 8;
const CREATORS: usize = 32;

#[tokio::main]
async fn main() {
    let tasks: usize = std::env::var("BENCH_TASKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    println!(
        "lifecycle benchmark: {tasks} tasks per store, {WORKERS} workers leasing one task at a time"
    );
    println!(
        "{:<10} {:>12} {:>22} {:>10} {:>10}",
        "store", "create/s", "lease+complete/s", "p50 ms", "p99 ms"
    );

    let dir = tempfile::tempdir().expect("temporary directory");
    let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
    run("sqlite", &sqlite, tasks).await;

    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let name = format!("oncely_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&base)
        .await
        .expect("PostgreSQL (set DATABASE_URL)");
    let url = match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("DATABASE_URL names no database"),
    };
    run("postgres", &url, tasks).await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
}

/// Starts the server on `url`, creates `tasks` tasks, and has the workers
/// lease and complete them all; prints one line.
async fn run(store: &str, url: &str, tasks: usize) {
    let server = Server::start(url).await;
    let channel = server.channel();

    let started = Instant::now();
    let per_creator = tasks.div_ceil(CREATORS);
    let creators: Vec<_> = (0..CREATORS)
        .map(|_| {
            let mut client = TaskServiceClient::new(channel.clone());
            tokio::spawn(async move {
                for _ in 0..per_creator {
                    let mut request = Request::new(CreateTaskRequest {
                        agent_id: "bench".into(),
                        action: "send_email".into(),
                        parameters: None,
                    });
                    let key = uuid::Uuid::new_v4().to_string();
                    request
                        .metadata_mut()
                        .insert("idempotency-key", key.parse().expect("key"));
                    client.create_task(request).await.expect("create");
                }
            })
        })
        .collect();
    for creator in creators {
        creator.await.expect("creator");
    }
    let created = per_creator * CREATORS;
    let create_rate = created as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(created)));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let mut client = WorkerServiceClient::new(channel.clone());
            let latencies = latencies.clone();
            tokio::spawn(async move {
                loop {
                    let begun = Instant::now();
                    let leases = client
                        .lease_tasks(LeaseTasksRequest {
                            worker_id: format!("bench-{w}"),
                            ..Default::default()
                        })
                        .await
                        .expect("lease")
                        .into_inner()
                        .leases;
                    let Some(lease) = leases.into_iter().next() else {
                        return;
                    };
                    let task_id = lease.task.map(|t| t.task_id).unwrap_or_default();
                    client
                        .complete_task(CompleteTaskRequest {
                            task_id,
                            lease_token: lease.lease_token,
                            result: None,
                        })
                        .await
                        .expect("complete");
                    let took = begun.elapsed();
                    if let Ok(mut all) = latencies.lock() {
                        all.push(took);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    let elapsed = started.elapsed();
    let mut latencies = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    latencies.sort();
    let done = latencies.len();
    let percentile = |p: f64| {
        latencies
            .get(((done as f64 * p) as usize).min(done.saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{store:<10} {create_rate:>12.0} {:>22.0} {:>10.2} {:>10.2}",
        done as f64 / elapsed.as_secs_f64(),
        percentile(0.5),
        percentile(0.99)
    );
    assert_eq!(done, created, "every created task was leased and completed");
}

/// The release binary, serving on a free port.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    async fn start(url: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_oncely"))
            .env("DATABASE_URL", url)
            .env("LISTEN_ADDR", &addr)
            .env("RUST_LOG", "warn")
            // All the load comes from one address: measure the server, not
            // its per-caller rate limit.
            .env("RATE_LIMIT", "0")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the server");
        let server = Self { child, addr };
        for _ in 0..200 {
            let mut tasks = TaskServiceClient::new(server.channel());
            let probe = tasks
                .get_task(oncely::proto::tasks_v1::GetTaskRequest {
                    task_id: uuid::Uuid::nil().to_string(),
                })
                .await;
            if matches!(probe, Err(status) if status.code() == tonic::Code::NotFound) {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server did not start");
    }

    fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("address")
            .tcp_nodelay(true)
            .connect_lazy()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
