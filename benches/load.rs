//! The load generator: the real server binary (the same build: release's
//! settings under `cargo bench`) driven over gRPC on loopback by many
//! concurrent callers, one scenario after another, on each store.
//!
//! ```sh
//! cargo bench --bench load                          # 10 s per scenario, both stores
//! BENCH_SECONDS=3 BENCH_STORES=postgres cargo bench --bench load
//! BENCH_CONCURRENCY=64 BENCH_CONNECTIONS=8 cargo bench --bench load
//! scripts/bench                                     # with pgbench in the same run, and ratios
//! ```
//!
//! Settings (environment):
//!
//! - `BENCH_SECONDS` (10): how long each scenario is measured, after a
//!   one-second warm-up that is not counted.
//! - `BENCH_CONCURRENCY` (32): concurrent callers; caller `i` uses
//!   connection `i % BENCH_CONNECTIONS`.
//! - `BENCH_CONNECTIONS` (4): HTTP/2 connections (tonic channels).
//! - `BENCH_SCENARIOS` (all): which of the scenarios below to run,
//!   comma-separated.
//! - `BENCH_STORES` (`sqlite,postgres`); PostgreSQL is reached at
//!   `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//!   where the benchmark makes a database of its own and drops it.
//!
//! Each store gets one server (`MISSING_KEY_POLICY=fingerprint`, so keyless
//! calls are accepted) and these scenarios, in order:
//!
//! - `health`: `grpc.health.v1.Health/Check` of `tasks.v1.TaskService`, the
//!   cheapest call the server answers: the yardstick of a replay, which
//!   never reaches the database either.
//! - `create`: CreateTask with a fresh key each call.
//! - `replay`: 1,000 tasks are created first (not timed); each call then
//!   re-sends one of those 1,000 requests, round-robin, and must be answered
//!   with `idempotent-replayed: true`.
//! - `mixed`: alternately a fresh create and a replay.
//! - `http-create`, `http-replay`: `create` and `replay` over the JSON API
//!   (`POST /v1/tasks` with `Idempotency-Key`, HTTP/1.1 with kept-alive
//!   connections, one per caller); the replayed requests are the ones the
//!   replay scenario created over gRPC, so every replay crosses surfaces.
//! - `mcp-create`, `mcp-replay`: `create` and `replay` as MCP tool calls
//!   (`create_task` with `idempotency_key`) over streamable HTTP at `/mcp`,
//!   one MCP session (rmcp's client, HTTP/1.1 kept alive) per caller; the
//!   replayed requests are again the ones created over gRPC.
//! - `keyless`: CreateTask without a key, distinct parameters each call (so
//!   each creates a task, deduplicated by fingerprint).
//! - `lease+complete`: enough queued tasks are ensured first (not timed);
//!   then every caller is a worker looping LeaseTasks (one task) and
//!   CompleteTask. One operation is the pair. It stops early if the queue
//!   runs dry.
//! - `lease-batch`: tasks of about 8 KB of parameters (`BENCH_TASK_BYTES`)
//!   are ensured first, under an action of their own (not timed); then
//!   every caller is a worker that leases up to 32 of them at a time
//!   (`BENCH_LEASE_BATCH`, with a one-second long poll) and completes all
//!   it got at once. One operation is one task leased and completed; its
//!   latency is its whole round (the lease and the slowest completion).
//!   A worker whose long poll comes back empty stops; the window ends when
//!   all have.
//!
//! Per scenario it prints two lines for people and a `RESULT` line for
//! scripts, e.g.
//!
//! ```text
//! RESULT store=postgres scenario=create ops=12345 rate=4115.0 p50_ms=6.1 p99_ms=14.2 p999_ms=30.0 errors=0 wrong=0 rss_mib=23.4 peak_rss_mib=30.1 cpu_server=48.2 cpu_load=21.0 cpu_postgres=27.5 cpu_other=1.9 cpu_idle=1.4
//! ```
//!
//! `ops` counts successful calls started in the measured window; `rate` is
//! ops per second of that window; latencies are per successful call. Any
//! error status (or a call taking over 30 s) counts in `errors`, never
//! stops the run; `wrong` counts answers that succeeded but contradicted
//! the scenario (a replay not marked replayed, a fresh create marked
//! replayed). `rss_mib` is the server's resident memory after the scenario,
//! `peak_rss_mib` its high-water mark so far. The `cpu_*` figures split
//! the whole machine's CPU time in the window (all cores together, in
//! percent, from `/proc`): the server, this load generator, every
//! `postgres` process, the rest, and idle; with two shared cores, they
//! show which of the three a scenario is waiting for. Nothing here is
//! asserted.

mod common;

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use oncely::proto::tasks_v1::{
    CompleteTaskRequest, CreateTaskRequest, LeaseTasksRequest, Task,
    task_service_client::TaskServiceClient, worker_service_client::WorkerServiceClient,
};
use prost_types::{Struct, Value, value::Kind};
use tonic::{
    Request, Response, Status,
    metadata::{AsciiMetadataValue, MetadataMap},
    transport::Channel,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The uncounted run before each scenario's measurement.
const WARMUP: Duration = Duration::from_secs(1);
/// A call taking longer than this counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How many keyed requests the replay scenarios re-send.
const REPLAY_KEYS: usize = 1000;
/// The fewest queued tasks the lease scenario starts with.
const MIN_QUEUED: u64 = 20_000;
/// The longest the lease scenario's untimed top-up may take.
const MAX_TOPUP: Duration = Duration::from_secs(120);

/// The action of the lease-batch scenario's tasks, so that no other
/// scenario's task is among them.
const LARGE_ACTION: &str = "index_document";
/// The fewest and the most large tasks the lease-batch scenario starts with.
const MIN_LARGE: u64 = 5_000;
const MAX_LARGE: u64 = 60_000;

/// The benchmark's settings, from the environment.
#[derive(Debug, Clone, Copy)]
struct Settings {
    seconds: u64,
    concurrency: usize,
    connections: usize,
    /// The lease-batch scenario's tasks' size, and how many a worker asks for.
    task_bytes: usize,
    lease_batch: i32,
}

impl Settings {
    fn from_env() -> Self {
        fn read(name: &str, default: u64) -> u64 {
            match std::env::var(name) {
                Ok(value) => value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| panic!("{name} must be a positive whole number")),
                Err(_) => default,
            }
        }
        Self {
            seconds: read("BENCH_SECONDS", 10),
            concurrency: read("BENCH_CONCURRENCY", 32) as usize,
            connections: read("BENCH_CONNECTIONS", 4) as usize,
            task_bytes: read("BENCH_TASK_BYTES", 8 * 1024) as usize,
            lease_batch: i32::try_from(read("BENCH_LEASE_BATCH", 32))
                .expect("BENCH_LEASE_BATCH is at most 100"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Health,
    Create,
    Replay,
    Mixed,
    HttpCreate,
    HttpReplay,
    McpCreate,
    McpReplay,
    Keyless,
    LeaseComplete,
    LeaseBatch,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::Create => "create",
            Self::Replay => "replay",
            Self::Mixed => "mixed",
            Self::HttpCreate => "http-create",
            Self::HttpReplay => "http-replay",
            Self::McpCreate => "mcp-create",
            Self::McpReplay => "mcp-replay",
            Self::Keyless => "keyless",
            Self::LeaseComplete => "lease+complete",
            Self::LeaseBatch => "lease-batch",
        }
    }
}

/// The scenarios to run: `BENCH_SCENARIOS` (comma-separated names), default
/// all, always in the order above.
fn scenarios() -> Vec<Scenario> {
    let all = [
        Scenario::Health,
        Scenario::Create,
        Scenario::Replay,
        Scenario::Mixed,
        Scenario::HttpCreate,
        Scenario::HttpReplay,
        Scenario::McpCreate,
        Scenario::McpReplay,
        Scenario::Keyless,
        Scenario::LeaseComplete,
        Scenario::LeaseBatch,
    ];
    let Ok(wanted) = std::env::var("BENCH_SCENARIOS") else {
        return all.to_vec();
    };
    let wanted: Vec<&str> = wanted.split(',').map(str::trim).collect();
    for name in &wanted {
        assert!(
            all.iter().any(|s| s.name() == *name),
            "unknown scenario {name}; BENCH_SCENARIOS takes health, create, replay, mixed, http-create, http-replay, mcp-create, mcp-replay, keyless, lease+complete and lease-batch"
        );
    }
    all.into_iter()
        .filter(|s| wanted.contains(&s.name()))
        .collect()
}

/// What the callers of one server share.
#[derive(Debug)]
struct Shared {
    /// The replayed requests' keys; request `i` has parameters `n = i`.
    replay_keys: Vec<AsciiMetadataValue>,
    /// Makes every fresh request's parameters distinct.
    counter: AtomicU64,
    /// Which replayed request goes next.
    next_replay: AtomicU64,
    /// Tasks created so far on this server (all still queued until the
    /// lease scenario).
    created: AtomicU64,
    /// Large tasks created so far, for the lease-batch scenario.
    large_created: AtomicU64,
    /// The large tasks' filler text.
    large_body: String,
    /// How many large tasks a worker asks for at a time.
    lease_batch: i32,
    /// The server's JSON API, `http://host:port`.
    http_base: String,
    /// The server's MCP endpoint, `http://host:port/mcp`.
    mcp_url: String,
    /// Whether the replayed requests were created.
    prefilled: std::sync::atomic::AtomicBool,
}

/// One call's outcome.
#[derive(Debug)]
enum Outcome {
    Ok,
    /// Succeeded, but contradicted the scenario.
    Wrong,
    Error(Status),
    /// The lease found no task: the queue is empty.
    Empty,
}

/// One caller's clients, on its connection.
#[derive(Debug)]
struct Caller {
    index: usize,
    /// Calls this caller has made; the mixed scenario alternates on it.
    calls: u64,
    tasks: TaskServiceClient<Channel>,
    workers: WorkerServiceClient<Channel>,
    health: HealthClient<Channel>,
    worker_id: String,
    /// The JSON API's client: HTTP/1.1, a kept-alive connection.
    http: reqwest::Client,
    /// This caller's MCP session, opened on its first MCP call.
    mcp: Option<rmcp::service::RunningService<rmcp::RoleClient, ()>>,
}

/// What one caller saw in the measured window.
#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<Duration>,
    wrong: u64,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    /// How many callers stopped because the queue was empty, and when the
    /// last of them did.
    drained: usize,
    drained_at: Option<Instant>,
}

impl Tally {
    fn merge(&mut self, other: Self) {
        self.latencies.extend(other.latencies);
        self.wrong += other.wrong;
        for (code, count) in other.errors {
            *self.errors.entry(code).or_default() += count;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.drained += other.drained;
        self.drained_at = match (self.drained_at, other.drained_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    fn error(&mut self, status: &Status) {
        *self
            .errors
            .entry(format!("{:?}", status.code()))
            .or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{:?}: {}", status.code(), status.message()));
        }
    }
}

#[tokio::main]
async fn main() {
    let settings = Settings::from_env();
    println!(
        "load benchmark: {} s per scenario after a {} s warm-up, {} callers over {} connections",
        settings.seconds,
        WARMUP.as_secs(),
        settings.concurrency,
        settings.connections
    );
    for store in common::stores() {
        match store.as_str() {
            "sqlite" => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                run_store("sqlite", &url, settings).await;
            }
            "postgres" => {
                let db = common::PgDatabase::create().await;
                run_store("postgres", &db.url, settings).await;
                db.drop_now().await;
            }
            other => panic!("unknown store {other}; BENCH_STORES takes sqlite and postgres"),
        }
    }
}

/// Starts one server on `url` and runs every scenario against it.
async fn run_store(store: &str, url: &str, settings: Settings) {
    let server = common::Server::start(url, &[("MISSING_KEY_POLICY", "fingerprint")]).await;
    let channels: Vec<Channel> = (0..settings.connections)
        .map(|_| server.channel())
        .collect();
    let shared = Arc::new(Shared {
        replay_keys: (0..REPLAY_KEYS)
            .map(|_| {
                uuid::Uuid::new_v4()
                    .to_string()
                    .parse()
                    .expect("a uuid is a metadata value")
            })
            .collect(),
        counter: AtomicU64::new(0),
        next_replay: AtomicU64::new(0),
        created: AtomicU64::new(0),
        large_created: AtomicU64::new(0),
        large_body: "x".repeat(settings.task_bytes),
        lease_batch: settings.lease_batch,
        http_base: format!("http://{}", server.addr),
        mcp_url: format!("http://{}/mcp", server.mcp_addr),
        prefilled: std::sync::atomic::AtomicBool::new(false),
    });
    println!(
        "\n{store}: server started, {:.1} MiB resident",
        server.rss_mib()
    );

    let mut create_rate = 0.0;
    for scenario in scenarios() {
        match scenario {
            Scenario::Replay | Scenario::HttpReplay | Scenario::McpReplay
                if !shared.prefilled.swap(true, Ordering::Relaxed) =>
            {
                prefill_replays(&channels, &shared, settings).await
            }
            Scenario::LeaseComplete => {
                ensure_queued(&channels, &shared, settings, create_rate).await;
            }
            Scenario::LeaseBatch => {
                ensure_large_queued(&channels, &shared, settings, create_rate).await;
            }
            _ => {}
        }
        let (tally, window, cpu) = drive(scenario, &channels, &shared, settings, &server).await;
        let rate = report(store, scenario, tally, window, cpu, &server);
        if scenario == Scenario::Create {
            create_rate = rate;
        }
    }
}

/// Runs `scenario` with every caller for the warm-up and the measured
/// window; returns what was seen in the window, how long it was, and where
/// the machine's CPU went in it.
async fn drive(
    scenario: Scenario,
    channels: &[Channel],
    shared: &Arc<Shared>,
    settings: Settings,
    server: &common::Server,
) -> (Tally, Duration, common::CpuSplit) {
    let measure_from = Instant::now() + WARMUP;
    let deadline = measure_from + Duration::from_secs(settings.seconds);
    let callers: Vec<_> = (0..settings.concurrency)
        .map(|index| {
            let mut caller = Caller::new(index, channels);
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                loop {
                    let begun = Instant::now();
                    if begun >= deadline {
                        break;
                    }
                    let (outcome, tasks) = caller.call(scenario, &shared).await;
                    let took = begun.elapsed();
                    if let Outcome::Empty = outcome {
                        tally.drained = 1;
                        tally.drained_at = Some(Instant::now());
                        break;
                    }
                    if begun < measure_from {
                        continue;
                    }
                    match outcome {
                        Outcome::Ok => {
                            tally.latencies.extend(std::iter::repeat_n(took, tasks));
                        }
                        Outcome::Wrong => tally.wrong += 1,
                        Outcome::Error(status) => tally.error(&status),
                        Outcome::Empty => {}
                    }
                }
                tally
            })
        })
        .collect();
    // The callers run on their own: the CPU is sampled as the window opens.
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_from = common::CpuSample::take(server);
    let mut all = Tally::default();
    for caller in callers {
        all.merge(caller.await.expect("a caller panicked"));
    }
    let cpu = cpu_from.until(&common::CpuSample::take(server));
    // The window ends at the deadline, or earlier when every worker found
    // the queue empty.
    let end = match all.drained_at {
        Some(drained) if all.drained == settings.concurrency => drained.min(deadline),
        _ => deadline,
    };
    (all, end.saturating_duration_since(measure_from), cpu)
}

/// Prints the scenario's lines (for people, then `RESULT`); returns its
/// rate.
fn report(
    store: &str,
    scenario: Scenario,
    mut tally: Tally,
    window: Duration,
    cpu: common::CpuSplit,
    server: &common::Server,
) -> f64 {
    tally.latencies.sort_unstable();
    let ops = tally.latencies.len();
    let seconds = window.as_secs_f64();
    let rate = if seconds > 0.0 {
        ops as f64 / seconds
    } else {
        0.0
    };
    let p = |q: f64| common::percentile_ms(&tally.latencies, q);
    let (p50, p99, p999) = (p(0.5), p(0.99), p(0.999));
    let errors: u64 = tally.errors.values().sum();
    let (rss, peak) = (server.rss_mib(), server.peak_rss_mib());
    let name = scenario.name();
    let mut line = format!(
        "{store:<9} {name:<15} {ops:>8} ops in {seconds:>5.1} s = {rate:>8.0}/s   p50 {p50:>6.2} ms  p99 {p99:>6.2} ms  p99.9 {p999:>7.2} ms   RSS {rss:.1} MiB (peak {peak:.1})"
    );
    if errors > 0 {
        let codes: Vec<String> = tally
            .errors
            .iter()
            .map(|(code, count)| format!("{code} {count}"))
            .collect();
        line += &format!(
            "   ERRORS {errors} ({}; first: {})",
            codes.join(", "),
            tally.first_error.as_deref().unwrap_or("?")
        );
    }
    if tally.wrong > 0 {
        line += &format!("   WRONG ANSWERS {}", tally.wrong);
    }
    if tally.drained > 0 {
        line += "   (the queue ran dry)";
    }
    println!("{line}");
    println!("{:<25} {cpu}", "");
    println!(
        "RESULT store={store} scenario={name} ops={ops} rate={rate:.1} p50_ms={p50:.2} p99_ms={p99:.2} p999_ms={p999:.2} errors={errors} wrong={} rss_mib={rss:.1} peak_rss_mib={peak:.1} cpu_server={:.1} cpu_load={:.1} cpu_postgres={:.1} cpu_other={:.1} cpu_idle={:.1}",
        tally.wrong, cpu.server, cpu.load, cpu.postgres, cpu.other, cpu.idle
    );
    rate
}

/// Creates the replayed requests' tasks (not timed). Panics if any fails:
/// the replay scenarios would measure nothing.
async fn prefill_replays(channels: &[Channel], shared: &Arc<Shared>, settings: Settings) {
    let next = Arc::new(AtomicU64::new(0));
    let fillers: Vec<_> = (0..settings.concurrency)
        .map(|index| {
            let mut caller = Caller::new(index, channels);
            let (shared, next) = (shared.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= REPLAY_KEYS {
                        return;
                    }
                    let request = keyed(shared.replay_keys[i].clone(), i as u64);
                    match timed(caller.tasks.create_task(request)).await {
                        Ok(_) => {
                            shared.created.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => panic!("creating replayed request {i}: {status}"),
                    }
                }
            })
        })
        .collect();
    for filler in fillers {
        filler.await.expect("creating the replayed requests");
    }
}

/// Makes sure the queue holds enough tasks for the lease scenario: at least
/// [`MIN_QUEUED`], and half again what the create rate would make in the
/// warm-up and the window. The earlier scenarios' tasks count; the rest are
/// created now (not timed), for at most [`MAX_TOPUP`].
async fn ensure_queued(
    channels: &[Channel],
    shared: &Arc<Shared>,
    settings: Settings,
    create_rate: f64,
) {
    let span = (WARMUP.as_secs() + settings.seconds) as f64;
    let wanted = MIN_QUEUED.max((create_rate * span * 1.5) as u64);
    let queued = shared.created.load(Ordering::Relaxed);
    if queued >= wanted {
        return;
    }
    let failures = top_up(channels, shared, settings, wanted - queued, false).await;
    println!(
        "(queue topped up from {queued} to {} tasks before lease+complete{})",
        shared.created.load(Ordering::Relaxed),
        failed_note(failures)
    );
}

/// Makes sure the queue holds enough large tasks for the lease-batch
/// scenario: what the create rate would make in the warm-up and the window,
/// between [`MIN_LARGE`] and [`MAX_LARGE`], created now (not timed), for at
/// most [`MAX_TOPUP`].
async fn ensure_large_queued(
    channels: &[Channel],
    shared: &Arc<Shared>,
    settings: Settings,
    create_rate: f64,
) {
    let span = (WARMUP.as_secs() + settings.seconds) as f64;
    let wanted = ((create_rate * span) as u64).clamp(MIN_LARGE, MAX_LARGE);
    let queued = shared.large_created.load(Ordering::Relaxed);
    if queued >= wanted {
        return;
    }
    let failures = top_up(channels, shared, settings, wanted - queued, true).await;
    println!(
        "({} tasks of {} bytes queued before lease-batch, leased {} at a time{})",
        shared.large_created.load(Ordering::Relaxed),
        settings.task_bytes,
        settings.lease_batch,
        failed_note(failures)
    );
}

/// The outcome of a create that must make a new task: counted, and
/// wrong if it was answered as a replay.
fn created_afresh(shared: &Shared, answer: Result<Response<Task>, Status>) -> Outcome {
    match answer {
        Ok(response) => {
            shared.created.fetch_add(1, Ordering::Relaxed);
            if replayed(response.metadata()) {
                Outcome::Wrong
            } else {
                Outcome::Ok
            }
        }
        Err(status) => Outcome::Error(status),
    }
}

/// What a top-up line adds when creates failed: nothing, or how many.
fn failed_note(failures: u64) -> String {
    if failures > 0 {
        format!("; {failures} creates failed")
    } else {
        String::new()
    }
}

/// Creates `count` tasks with every caller (large ones for the lease-batch
/// scenario), not timed, for at most [`MAX_TOPUP`]; how many creates
/// failed.
async fn top_up(
    channels: &[Channel],
    shared: &Arc<Shared>,
    settings: Settings,
    count: u64,
    large: bool,
) -> u64 {
    let stop_at = Instant::now() + MAX_TOPUP;
    let left = Arc::new(AtomicU64::new(count));
    let fillers: Vec<_> = (0..settings.concurrency)
        .map(|index| {
            let mut caller = Caller::new(index, channels);
            let (shared, left) = (shared.clone(), left.clone());
            tokio::spawn(async move {
                let mut failures = 0u64;
                while Instant::now() < stop_at
                    && left
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok()
                {
                    let outcome = if large {
                        caller.create_large(&shared).await
                    } else {
                        caller.create(&shared).await
                    };
                    if !matches!(outcome, Outcome::Ok) {
                        failures += 1;
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = 0;
    for filler in fillers {
        failures += filler.await.expect("topping up the queue");
    }
    failures
}

impl Caller {
    fn new(index: usize, channels: &[Channel]) -> Self {
        let channel = channels[index % channels.len()].clone();
        Self {
            index,
            calls: 0,
            tasks: TaskServiceClient::new(channel.clone()),
            health: HealthClient::new(channel.clone()),
            workers: WorkerServiceClient::new(channel),
            worker_id: format!("bench-{index}"),
            http: reqwest::Client::new(),
            mcp: None,
        }
    }

    /// One operation of `scenario`, with how many tasks it counts for.
    async fn call(&mut self, scenario: Scenario, shared: &Shared) -> (Outcome, usize) {
        let outcome = match scenario {
            Scenario::Health => self.health().await,
            Scenario::Create => self.create(shared).await,
            Scenario::Replay => self.replay(shared).await,
            Scenario::Mixed => {
                // Each caller alternates, half of them starting with a
                // create: as many creates as replays are made.
                self.calls += 1;
                if (self.index as u64 + self.calls).is_multiple_of(2) {
                    self.create(shared).await
                } else {
                    self.replay(shared).await
                }
            }
            Scenario::HttpCreate => {
                let key = uuid::Uuid::new_v4().to_string();
                let n = shared.counter.fetch_add(1, Ordering::Relaxed);
                self.http_create(shared, &key, n, false).await
            }
            Scenario::HttpReplay => {
                let i = shared.next_replay.fetch_add(1, Ordering::Relaxed) as usize % REPLAY_KEYS;
                let key = shared.replay_keys[i]
                    .to_str()
                    .unwrap_or_default()
                    .to_owned();
                self.http_create(shared, &key, i as u64, true).await
            }
            Scenario::McpCreate => {
                let key = uuid::Uuid::new_v4().to_string();
                let n = shared.counter.fetch_add(1, Ordering::Relaxed);
                self.mcp_create(shared, &key, n, false).await
            }
            Scenario::McpReplay => {
                let i = shared.next_replay.fetch_add(1, Ordering::Relaxed) as usize % REPLAY_KEYS;
                let key = shared.replay_keys[i]
                    .to_str()
                    .unwrap_or_default()
                    .to_owned();
                self.mcp_create(shared, &key, i as u64, true).await
            }
            Scenario::Keyless => self.keyless(shared).await,
            Scenario::LeaseComplete => self.lease_and_complete().await,
            Scenario::LeaseBatch => return self.lease_batch(shared).await,
        };
        (outcome, 1)
    }

    /// A create with a fresh key: must not be marked replayed.
    async fn create(&mut self, shared: &Shared) -> Outcome {
        let n = shared.counter.fetch_add(1, Ordering::Relaxed);
        let key = uuid::Uuid::new_v4()
            .to_string()
            .parse()
            .expect("a uuid is a metadata value");
        let answer = timed(self.tasks.create_task(keyed(key, n))).await;
        created_afresh(shared, answer)
    }

    /// POST /v1/tasks of [`create_request`] `n` with `key`: must be 201 and
    /// marked replayed when `replay` says so, and only then.
    async fn http_create(&mut self, shared: &Shared, key: &str, n: u64, replay: bool) -> Outcome {
        let body = serde_json::json!({
            "agent_id": "bench",
            "action": "send_email",
            "parameters": {"to": "a@example.com", "n": n},
        });
        let sent = self
            .http
            .post(format!("{}/v1/tasks", shared.http_base))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(CALL_TIMEOUT)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => return Outcome::Error(Status::unavailable(error.to_string())),
        };
        let status = response.status().as_u16();
        let was_replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|value| value == "true");
        // The body is read, as a client would.
        if response.bytes().await.is_err() || status != 201 {
            return Outcome::Error(Status::unknown(format!("HTTP {status}")));
        }
        if !replay {
            shared.created.fetch_add(1, Ordering::Relaxed);
        }
        if was_replayed == replay {
            Outcome::Ok
        } else {
            Outcome::Wrong
        }
    }

    /// The MCP tool call `create_task` of [`create_request`] `n` with
    /// `key`: must succeed, marked replayed when `replay` says so, and only
    /// then.
    async fn mcp_create(&mut self, shared: &Shared, key: &str, n: u64, replay: bool) -> Outcome {
        use rmcp::{
            ServiceExt,
            model::CallToolRequestParams,
            transport::{
                StreamableHttpClientTransport,
                streamable_http_client::StreamableHttpClientTransportConfig,
            },
        };
        if self.mcp.is_none() {
            let transport = StreamableHttpClientTransport::from_config(
                StreamableHttpClientTransportConfig::with_uri(shared.mcp_url.clone()),
            );
            match ().serve(transport).await {
                Ok(session) => self.mcp = Some(session),
                Err(error) => return Outcome::Error(Status::unavailable(error.to_string())),
            }
        }
        let Some(session) = &self.mcp else {
            return Outcome::Error(Status::internal("no MCP session"));
        };
        let arguments = serde_json::json!({
            "agent_id": "bench",
            "action": "send_email",
            "parameters": {"to": "a@example.com", "n": n},
            "idempotency_key": key,
        });
        let Some(arguments) = arguments.as_object().cloned() else {
            return Outcome::Error(Status::internal("arguments are an object"));
        };
        let call =
            session.call_tool(CallToolRequestParams::new("create_task").with_arguments(arguments));
        let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(result)) => result,
            Ok(Err(error)) => return Outcome::Error(Status::unknown(error.to_string())),
            Err(_) => return Outcome::Error(Status::deadline_exceeded("no answer")),
        };
        if result.is_error != Some(false) {
            let text = result
                .content
                .first()
                .and_then(|block| block.as_text())
                .map(|text| text.text.clone())
                .unwrap_or_default();
            return Outcome::Error(Status::unknown(text));
        }
        if !replay {
            shared.created.fetch_add(1, Ordering::Relaxed);
        }
        let was_replayed = result
            .structured_content
            .as_ref()
            .is_some_and(|content| content["replayed"] == true);
        if was_replayed == replay {
            Outcome::Ok
        } else {
            Outcome::Wrong
        }
    }

    /// A create of a large task for the lease-batch scenario, keyless.
    async fn create_large(&mut self, shared: &Shared) -> Outcome {
        let n = shared.counter.fetch_add(1, Ordering::Relaxed);
        let request = Request::new(large_request(n, &shared.large_body));
        match timed(self.tasks.create_task(request)).await {
            Ok(_) => {
                shared.large_created.fetch_add(1, Ordering::Relaxed);
                Outcome::Ok
            }
            Err(status) => Outcome::Error(status),
        }
    }

    /// One of the replayed requests again, byte for byte: must be marked
    /// replayed.
    async fn replay(&mut self, shared: &Shared) -> Outcome {
        let i = shared.next_replay.fetch_add(1, Ordering::Relaxed) as usize % REPLAY_KEYS;
        let request = keyed(shared.replay_keys[i].clone(), i as u64);
        match timed(self.tasks.create_task(request)).await {
            Ok(response) if replayed(response.metadata()) => Outcome::Ok,
            Ok(_) => Outcome::Wrong,
            Err(status) => Outcome::Error(status),
        }
    }

    /// A health check of the task service: must say SERVING.
    async fn health(&mut self) -> Outcome {
        let request = HealthCheckRequest {
            service: "tasks.v1.TaskService".into(),
        };
        match timed(self.health.check(request)).await {
            Ok(response) if response.get_ref().status() == ServingStatus::Serving => Outcome::Ok,
            Ok(_) => Outcome::Wrong,
            Err(status) => Outcome::Error(status),
        }
    }

    /// A create without a key, with parameters no other call has.
    async fn keyless(&mut self, shared: &Shared) -> Outcome {
        let n = shared.counter.fetch_add(1, Ordering::Relaxed);
        let answer = timed(self.tasks.create_task(Request::new(create_request(n)))).await;
        created_afresh(shared, answer)
    }

    /// Leases up to `settings.lease_batch` large tasks (waiting up to a
    /// second for one) and completes them all at once; with how many it
    /// completed.
    async fn lease_batch(&mut self, shared: &Shared) -> (Outcome, usize) {
        let leased = timed(self.workers.lease_tasks(LeaseTasksRequest {
            worker_id: self.worker_id.clone(),
            actions: vec![LARGE_ACTION.into()],
            max_tasks: shared.lease_batch,
            wait: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        }))
        .await;
        let leases = match leased {
            Ok(response) => response.into_inner().leases,
            Err(status) => return (Outcome::Error(status), 0),
        };
        if leases.is_empty() {
            return (Outcome::Empty, 0);
        }
        let count = leases.len();
        let completions = leases.into_iter().map(|lease| {
            let mut workers = self.workers.clone();
            async move {
                timed(workers.complete_task(CompleteTaskRequest {
                    task_id: lease.task.map(|task| task.task_id).unwrap_or_default(),
                    lease_token: lease.lease_token,
                    result: None,
                }))
                .await
            }
        });
        for done in futures::future::join_all(completions).await {
            if let Err(status) = done {
                return (Outcome::Error(status), 0);
            }
        }
        (Outcome::Ok, count)
    }

    /// Leases one task and completes it.
    async fn lease_and_complete(&mut self) -> Outcome {
        let leased = timed(self.workers.lease_tasks(LeaseTasksRequest {
            worker_id: self.worker_id.clone(),
            max_tasks: 1,
            ..Default::default()
        }))
        .await;
        let lease = match leased {
            Ok(response) => match response.into_inner().leases.into_iter().next() {
                Some(lease) => lease,
                None => return Outcome::Empty,
            },
            Err(status) => return Outcome::Error(status),
        };
        let task_id = lease.task.map(|task| task.task_id).unwrap_or_default();
        match timed(self.workers.complete_task(CompleteTaskRequest {
            task_id,
            lease_token: lease.lease_token,
            result: None,
        }))
        .await
        {
            Ok(_) => Outcome::Ok,
            Err(status) => Outcome::Error(status),
        }
    }
}

/// The lease-batch scenario's CreateTask: `body` is its filler.
fn large_request(n: u64, body: &str) -> CreateTaskRequest {
    let value = |kind| Value { kind: Some(kind) };
    CreateTaskRequest {
        agent_id: "bench".into(),
        action: LARGE_ACTION.into(),
        parameters: Some(Struct {
            fields: [
                ("n".to_owned(), value(Kind::NumberValue(n as f64))),
                ("body".to_owned(), value(Kind::StringValue(body.to_owned()))),
            ]
            .into_iter()
            .collect(),
        }),
    }
}

/// The CreateTask every scenario sends, told apart by `n`.
fn create_request(n: u64) -> CreateTaskRequest {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let number = Value {
        kind: Some(Kind::NumberValue(n as f64)),
    };
    CreateTaskRequest {
        agent_id: "bench".into(),
        action: "send_email".into(),
        parameters: Some(Struct {
            fields: [
                ("to".to_owned(), string("a@example.com")),
                ("n".to_owned(), number),
            ]
            .into_iter()
            .collect(),
        }),
    }
}

/// [`create_request`] `n` with `key` as its idempotency key.
fn keyed(key: AsciiMetadataValue, n: u64) -> Request<CreateTaskRequest> {
    let mut request = Request::new(create_request(n));
    request.metadata_mut().insert("idempotency-key", key);
    request
}

fn replayed(metadata: &MetadataMap) -> bool {
    metadata
        .get("idempotent-replayed")
        .is_some_and(|value| value == "true")
}

/// `call`, failed with DEADLINE_EXCEEDED past [`CALL_TIMEOUT`].
async fn timed<T>(call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "the benchmark's 30 s call timeout",
            ))
        })
}
