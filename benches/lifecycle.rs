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
//! database of its own there and drops it. `BENCH_STORES=sqlite` runs one
//! store. Results go to standard output;
//! they are recorded in BENCHMARKS.md. Nothing here is a test: timings are
//! reported, never asserted.

mod common;

use std::{sync::Arc, time::Instant};

use oncely::proto::tasks_v1::{
    CompleteTaskRequest, CreateTaskRequest, LeaseTasksRequest,
    task_service_client::TaskServiceClient, worker_service_client::WorkerServiceClient,
};
use tonic::Request;

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
    for store in common::stores() {
        match store.as_str() {
            "sqlite" => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                run("sqlite", &url, tasks).await;
            }
            "postgres" => {
                let db = common::PgDatabase::create().await;
                run("postgres", &db.url, tasks).await;
                db.drop_now().await;
            }
            other => panic!("unknown store {other}; BENCH_STORES takes sqlite and postgres"),
        }
    }
}

/// Starts the server on `url`, creates `tasks` tasks, and has the workers
/// lease and complete them all; prints one line.
async fn run(store: &str, url: &str, tasks: usize) {
    let server = common::Server::start(url, &[]).await;
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
    let percentile = |p: f64| common::percentile_ms(&latencies, p);
    println!(
        "{store:<10} {create_rate:>12.0} {:>22.0} {:>10.2} {:>10.2}",
        done as f64 / elapsed.as_secs_f64(),
        percentile(0.5),
        percentile(0.99)
    );
    assert_eq!(done, created, "every created task was leased and completed");
}
