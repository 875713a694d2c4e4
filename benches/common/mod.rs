//! What the benchmarks share: the server binary of the same build
//! (release's settings under `cargo bench`) on a free port, a PostgreSQL
//! database of their own, percentiles and the server's memory.

// Each benchmark uses part of this module.
#![allow(dead_code)]

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use oncely::proto::tasks_v1::task_service_client::TaskServiceClient;
use sqlx::Connection;
use tonic::transport::Channel;

/// The server binary of the same build, serving on a free port.
pub(crate) struct Server {
    child: Child,
    pub(crate) addr: String,
    /// Where it serves MCP (streamable HTTP at `/mcp`).
    pub(crate) mcp_addr: String,
}

/// A port free now, for a server to bind.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Server {
    /// Starts the server on `url` with `env` on top of the benchmark's
    /// settings, and waits until it answers.
    pub(crate) async fn start(url: &str, env: &[(&str, &str)]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mcp_addr = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_oncely"));
        command
            .env("DATABASE_URL", url)
            .env("LISTEN_ADDR", &addr)
            .env("MCP_ADDR", &mcp_addr)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // All the load comes from one address: measure the server, not
            // its per-caller limits.
            .env("RATE_LIMIT", "0")
            .env("MAX_IN_FLIGHT_PER_CALLER", "100000")
            .stdout(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().expect("start the server");
        let server = Self {
            child,
            addr,
            mcp_addr,
        };
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

    /// A new channel (one connection) to the server.
    pub(crate) fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("address")
            .tcp_nodelay(true)
            .connect_lazy()
    }

    /// The server's resident memory now, in MiB.
    pub(crate) fn rss_mib(&self) -> f64 {
        status_kib(self.child.id(), "VmRSS:") / 1024.0
    }

    /// The server's peak resident memory so far, in MiB.
    pub(crate) fn peak_rss_mib(&self) -> f64 {
        status_kib(self.child.id(), "VmHWM:") / 1024.0
    }
}

fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL database of the benchmark's own, dropped at the end.
pub(crate) struct PgDatabase {
    admin: sqlx::PgConnection,
    name: String,
    pub(crate) url: String,
}

impl PgDatabase {
    /// Creates it on the server of `DATABASE_URL` (default: the local
    /// PostgreSQL).
    pub(crate) async fn create() -> Self {
        let base = base_url();
        let name = format!("oncely_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&base)
            .await
            .expect("PostgreSQL (set DATABASE_URL)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create the benchmark database");
        let url = match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("DATABASE_URL names no database"),
        };
        Self { admin, name, url }
    }

    /// Drops it.
    pub(crate) async fn drop_now(mut self) {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut self.admin)
        .await;
    }
}

/// The PostgreSQL server the benchmarks use.
pub(crate) fn base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The `p` quantile of sorted latencies, in milliseconds.
pub(crate) fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[index].as_secs_f64() * 1000.0
}

/// Which stores to run: `BENCH_STORES` (comma-separated), default both.
pub(crate) fn stores() -> Vec<String> {
    std::env::var("BENCH_STORES")
        .unwrap_or_else(|_| "sqlite,postgres".to_owned())
        .split(',')
        .map(|store| store.trim().to_owned())
        .filter(|store| !store.is_empty())
        .collect()
}

/// Where the machine's CPU time went between two [`CpuSample`]s: shares of
/// all cores' time, in percent.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuSplit {
    pub(crate) server: f64,
    pub(crate) load: f64,
    pub(crate) postgres: f64,
    pub(crate) other: f64,
    pub(crate) idle: f64,
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU: server {:.0}%, load generator {:.0}%, PostgreSQL {:.0}%, other {:.0}%, idle {:.0}%",
            self.server, self.load, self.postgres, self.other, self.idle
        )
    }
}

/// CPU time so far (in the kernel's clock ticks, from `/proc`) of the
/// server, this process, every `postgres` process, and the whole machine.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuSample {
    server: u64,
    load: u64,
    postgres: u64,
    busy: u64,
    total: u64,
}

impl CpuSample {
    /// Reads it now; what cannot be read counts as zero.
    pub(crate) fn take(server: &Server) -> Self {
        let (busy, total) = machine_ticks();
        Self {
            server: process_ticks(&server.child.id().to_string()).unwrap_or(0),
            load: process_ticks("self").unwrap_or(0),
            postgres: postgres_ticks(),
            busy,
            total,
        }
    }

    /// The split of the time from `self` to `later`.
    pub(crate) fn until(&self, later: &Self) -> CpuSplit {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        let share = |a: u64, b: u64| b.saturating_sub(a) as f64 * 100.0 / total;
        let server = share(self.server, later.server);
        let load = share(self.load, later.load);
        let postgres = share(self.postgres, later.postgres);
        let busy = share(self.busy, later.busy);
        CpuSplit {
            server,
            load,
            postgres,
            other: (busy - server - load - postgres).max(0.0),
            idle: (100.0 - busy).max(0.0),
        }
    }
}

/// User and system time of `/proc/<pid>/stat`, in clock ticks.
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count from after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields 14 and 15 of the line (utime, stime); the state, field 3, is
    // the first after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU time of every process named `postgres` (the server and its
/// backends; a backend that exits takes its time with it).
fn postgres_ticks() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().into_string().ok()?;
            pid.bytes().all(|b| b.is_ascii_digit()).then_some(pid)
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        })
        .filter_map(|pid| process_ticks(&pid))
        .sum()
}

/// The whole machine's busy and total clock ticks (`/proc/stat`; idle and
/// I/O wait count as not busy).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|line| line.starts_with("cpu ")) else {
        return (0, 0);
    };
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user's).
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}
