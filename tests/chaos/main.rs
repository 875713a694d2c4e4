//! The chaos harness: a randomized workload against real `oncely`
//! instances while faults are injected, then an exactly-once checker over
//! what the clients saw and what the database holds.
//!
//! ```text
//! cargo test --test chaos -- [short|long] [postgres|sqlite|both] [--seed N]
//! cargo test --test chaos -- [short|long] patroni [--replication strict|sync|async]
//! ```
//!
//! On PostgreSQL, three instances share one database, each through a TCP
//! proxy that faults cut and stall; PostgreSQL itself is restarted with
//! `pg_ctlcluster` when it runs on this machine (`--no-pg-restart` turns
//! that off: it disturbs anything else using that server). On SQLite, one
//! instance on its file. The short mode (at least 2,000 operations and 10
//! faults per store) runs in `.ci/run`; the long mode (20,000 operations,
//! 100 faults) is run by hand and recorded in RELIABILITY.md. Exits
//! non-zero on any anomaly, or when a run fell short of its minimums.
//!
//! `patroni` runs the PostgreSQL workload on a cluster of three PostgreSQL
//! nodes under Patroni (`scripts/patroni-cluster`, which this starts and
//! stops; it needs root and the Debian packages patroni, etcd-server,
//! etcd-client and haproxy), reached through haproxy, with the cluster's
//! faults (switchovers, failovers after a kill -9 of the primary's
//! postmaster or of its whole node, replication cut) one after another
//! beside the instance faults. The short mode makes at least 6 failovers,
//! the long one 50. With strict or sync replication it first checks what a
//! create answers while no standby runs. An asynchronous run is expected to
//! find lost acknowledged creates: it shows what the checker sees.
//!
//! Not part of `cargo test`'s default run (`test = false` in Cargo.toml):
//! it restarts the database server other tests use.

mod checker;
mod cluster;
#[path = "../api/support/db_proxy.rs"]
mod db_proxy;
mod faults;
mod history;
mod patroni;
mod workload;

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;

use crate::{
    checker::Anomaly,
    cluster::{Cluster, Database, Store},
    faults::{Fault, Tally},
    history::{Answer, History},
    patroni::{Patroni, Replication},
    workload::{KeyPool, Workload},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// At least 2,000 operations and 10 faults per store (CI).
    Short,
    /// At least 20,000 operations and 100 faults per store (by hand).
    Long,
    /// On `patroni`: only the probes made before the workload (a create
    /// with no standby, start-up with no primary, a lost write), no
    /// workload.
    Probes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Stores {
    Both,
    Postgres,
    Sqlite,
    /// PostgreSQL under Patroni, with failovers (not part of `both`).
    Patroni,
}

/// Randomized faults and an exactly-once checker against real instances.
#[derive(Debug, Parser)]
#[command(name = "chaos")]
struct Args {
    #[arg(value_enum, default_value = "short")]
    mode: Mode,
    #[arg(value_enum, default_value = "both")]
    stores: Stores,
    /// The seed of the workload's and the faults' choices (printed, so
    /// that a run can be repeated); random when unset.
    #[arg(long)]
    seed: Option<u64>,
    /// Do not restart PostgreSQL (say, when it is shared with others).
    #[arg(long)]
    no_pg_restart: bool,
    /// Keep the database and the servers' logs after a clean run too.
    #[arg(long)]
    keep: bool,
    /// The Patroni cluster's replication (with `patroni`).
    #[arg(long, value_enum, default_value = "strict")]
    replication: Replication,
}

/// How much one run does, by mode.
#[derive(Debug, Clone, Copy)]
struct Plan {
    min_operations: u64,
    min_faults: u64,
    /// Runs at least this long, so that keys expire and cleanup deletes.
    min_time: Duration,
    /// Gives up (a failure) if the minimums are not met by then.
    max_time: Duration,
    agents: usize,
    workers: usize,
    /// Time between faults, at random within.
    fault_gap: (Duration, Duration),
    /// On a Patroni cluster: primaries handed over.
    min_failovers: u64,
}

impl Plan {
    fn of(mode: Mode) -> Self {
        let secs = Duration::from_secs;
        match mode {
            Mode::Short => Plan {
                min_operations: 2_000,
                min_faults: 10,
                min_time: secs(40),
                max_time: secs(240),
                agents: 12,
                workers: 6,
                fault_gap: (Duration::from_millis(1000), Duration::from_millis(3000)),
                min_failovers: 6,
            },
            Mode::Long => Plan {
                min_operations: 20_000,
                min_faults: 100,
                min_time: secs(300),
                max_time: secs(1800),
                agents: 12,
                workers: 6,
                fault_gap: (Duration::from_millis(1000), Duration::from_millis(3000)),
                min_failovers: 50,
            },
            Mode::Probes => Plan {
                min_operations: 0,
                min_faults: 0,
                min_time: Duration::ZERO,
                max_time: secs(60),
                agents: 0,
                workers: 0,
                fault_gap: (Duration::from_millis(1000), Duration::from_millis(3000)),
                min_failovers: 0,
            },
        }
    }
}

/// What one store's run did and found.
struct Report {
    /// The store, and on Patroni its replication.
    label: String,
    instances: usize,
    elapsed: Duration,
    drained_in: Duration,
    history: Arc<History>,
    tally: Arc<Tally>,
    tasks: usize,
    by_status: [usize; 6],
    anomalies: Vec<Anomaly>,
    shortfall: Option<String>,
    /// On Patroni with a synchronous replication: what a create answered
    /// while no standby ran.
    no_standby: Option<patroni::NoStandby>,
    /// On Patroni: health and start-up while no node was primary.
    no_primary: Option<patroni::NoPrimary>,
    /// On Patroni: a write kept off the standbys, then the primary lost.
    lost_write: Option<patroni::LostWrite>,
    /// The anomalies that fail the run: all of them, but on an
    /// asynchronous cluster only those that lost commits do not explain
    /// (see `checker::LOST_COMMITS_EXPLAIN`).
    failing: usize,
    /// How often the instances' listeners lost the database and found it
    /// again.
    listeners: (usize, usize),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let plan = Plan::of(args.mode);
    let stores = match args.stores {
        Stores::Both => vec![Store::Postgres, Store::Sqlite],
        Stores::Postgres | Stores::Patroni => vec![Store::Postgres],
        Stores::Sqlite => vec![Store::Sqlite],
    };
    let patroni = (args.stores == Stores::Patroni).then_some(args.replication);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!("chaos: {:?} mode, seed {seed}", args.mode);
    let mut failed = false;
    let mut expected_anomalies = false;
    for store in stores {
        match runtime.block_on(run(store, patroni, plan, seed, &args)) {
            Ok(report) => {
                print_report(&report, plan);
                // An asynchronous cluster is expected to lose acknowledged
                // work: that run reports what the checker found, and fails
                // only on what lost commits do not explain.
                failed |= report.failing > 0 || report.shortfall.is_some();
                if report.anomalies.len() > report.failing {
                    expected_anomalies = true;
                    println!(
                        "chaos: {} of the anomalies above are those asynchronous replication allows; not a failure",
                        report.anomalies.len() - report.failing
                    );
                }
            }
            Err(error) => {
                println!("chaos {}: the run could not be made: {error}", store.name());
                failed = true;
            }
        }
    }
    if failed {
        println!("chaos: FAILED (seed {seed})");
        ExitCode::FAILURE
    } else if expected_anomalies {
        println!("chaos: passed; the anomalies found are those asynchronous replication allows");
        ExitCode::SUCCESS
    } else {
        println!("chaos: passed, no anomalies");
        ExitCode::SUCCESS
    }
}

async fn run(
    store: Store,
    patroni: Option<Replication>,
    plan: Plan,
    seed: u64,
    args: &Args,
) -> Result<Report, String> {
    let dir = tempfile::Builder::new()
        .prefix("oncely-chaos-")
        .tempdir()
        .map_err(|e| format!("a temporary folder: {e}"))?;
    let path = dir.path().to_owned();
    // On an error the logs stay, for the message that points at them.
    let patroni = match patroni {
        Some(replication) => {
            println!(
                "chaos patroni: bringing up a cluster ({} replication)",
                replication.name()
            );
            let cluster = Patroni::up(replication).await?;
            println!("chaos patroni: cluster up in {}", cluster.dir());
            Some(Arc::new(cluster))
        }
        None => None,
    };
    run_in(store, patroni, plan, seed, args, dir)
        .await
        .map_err(|error| {
            if path.exists() {
                format!("{error} (logs kept in {})", path.display())
            } else {
                error
            }
        })
}

async fn run_in(
    store: Store,
    patroni: Option<Arc<Patroni>>,
    plan: Plan,
    seed: u64,
    args: &Args,
    dir: tempfile::TempDir,
) -> Result<Report, String> {
    // Kept unless the run ends well (below).
    let dir = dir.keep();
    let label = match &patroni {
        Some(p) => format!("patroni ({})", p.replication.name()),
        None => store.name().to_owned(),
    };
    let database = Database::create(store, &dir, patroni.as_ref().map(|_| patroni::URL)).await?;
    let restart_postgres = patroni.is_none()
        && !args.no_pg_restart
        && database.is_local_postgres()
        && faults::can_restart_postgres();
    let count = match store {
        Store::Postgres => 3,
        Store::Sqlite => 1,
    };
    let cluster = Arc::new(Cluster::start(database, count, &dir).await?);
    println!(
        "chaos {label}: {count} instance(s) serving; logs in {}",
        dir.display()
    );
    if let Some(patroni) = &patroni {
        // Its logs stay if the run stops midway (unkept below otherwise).
        patroni.keep();
    }
    let no_standby = match &patroni {
        Some(p) if p.replication != Replication::Async => {
            let seen = patroni::standby_missing(&cluster, p).await?;
            println!(
                "chaos {label}: a create with no standby running answered {}; its retry once one was back answered {}",
                seen.first, seen.retry
            );
            Some(seen)
        }
        _ => None,
    };
    let no_primary = match &patroni {
        Some(p) => {
            let seen = patroni::start_without_primary(&cluster, p.clone()).await?;
            println!(
                "chaos {label}: with no primary, a running instance said NOT_SERVING {:.1} s after the node was killed; an instance started then served {:.1} s later ({})",
                seen.not_serving_after.as_secs_f64(),
                seen.serving_after.as_secs_f64(),
                seen.failover
            );
            Some(seen)
        }
        None => None,
    };
    let lost_write = match &patroni {
        Some(p) => {
            let seen = patroni::lost_write(&cluster, p).await?;
            println!(
                "chaos {label}: a create while replication was cut answered {}; then {}; an acknowledged create lost: {}",
                seen.first,
                seen.retries.join(", "),
                if seen.lost { "yes" } else { "no" }
            );
            Some(seen)
        }
        None => None,
    };
    if store == Store::Postgres && patroni.is_none() && !restart_postgres {
        println!("chaos postgres: PostgreSQL restarts are off (not local, or --no-pg-restart)");
    }

    let history = Arc::new(History::default());
    let work = Arc::new(Workload {
        cluster: cluster.clone(),
        history: history.clone(),
        keys: KeyPool::new(),
        agents_stop: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        workers_stop: AtomicBool::new(false),
    });
    let tally = Arc::new(Tally::default());
    let faults_stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    for i in 0..plan.agents {
        agents.spawn(workload::agent(work.clone(), seed ^ (i as u64 + 1)));
    }
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..plan.workers {
        workers.spawn(workload::worker(work.clone(), i, seed ^ (1000 + i as u64)));
    }
    let injector = tokio::spawn(faults::run(
        cluster.clone(),
        Fault::kinds(store, restart_postgres),
        plan.fault_gap,
        tally.clone(),
        faults_stop.clone(),
        seed ^ 0xfa17,
    ));
    let cluster_faults = patroni.clone().map(|p| {
        tokio::spawn(faults::run_patroni(
            p,
            plan.fault_gap,
            tally.clone(),
            faults_stop.clone(),
            seed ^ 0xc105,
        ))
    });
    let failovers = || tally.failovers.load(Ordering::SeqCst);

    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let operations = history.counts.operations();
        let elapsed = started.elapsed();
        if elapsed >= plan.min_time
            && operations >= plan.min_operations
            && tally.disruptive() >= plan.min_faults
            && (patroni.is_none() || failovers() >= plan.min_failovers)
            || elapsed >= plan.max_time
        {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(15) {
            last_print = Instant::now();
            println!(
                "chaos {label}: {:>4.0} s, {operations} operations, {} faults, {} failovers",
                elapsed.as_secs_f64(),
                tally.disruptive(),
                failovers()
            );
        }
    }

    // Stop the agents and the faults, bring everything back, and let the
    // workers (no longer dying or failing) finish every task.
    work.agents_stop.store(true, Ordering::SeqCst);
    faults_stop.store(true, Ordering::SeqCst);
    while agents.join_next().await.is_some() {}
    injector
        .await
        .map_err(|e| format!("the fault injector: {e}"))?;
    if let Some(cluster_faults) = cluster_faults {
        cluster_faults
            .await
            .map_err(|e| format!("the cluster's fault injector: {e}"))?;
    }
    let elapsed = started.elapsed();
    if restart_postgres {
        faults::ensure_postgres_up().await?;
    }
    if let Some(patroni) = &patroni {
        patroni.run(&["start-nodes"]).await?;
        patroni.run(&["wait-healthy"]).await?;
    }
    cluster.heal().await?;
    work.draining.store(true, Ordering::SeqCst);
    let drain_started = Instant::now();
    // Long enough for a lease to run out, the backoff after it, and a
    // task's every remaining attempt.
    let drain_limit = Duration::from_secs(60);
    // Done when nothing is left twice, 3 s apart: a create an agent gave up
    // on may still commit late (a paused instance resumed by the heal).
    let mut empty_since = None;
    while drain_started.elapsed() < drain_limit {
        match cluster.database.unfinished().await {
            Ok(0) => {
                let since = *empty_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(3) {
                    break;
                }
            }
            _ => empty_since = None,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drained_in = drain_started.elapsed();
    work.workers_stop.store(true, Ordering::SeqCst);
    while workers.join_next().await.is_some() {}
    cluster.stop().await;

    let rows = cluster.database.tasks().await?;
    let mut anomalies = checker::check(&history, &rows);
    let listeners = cluster.listeners();
    for detail in &listeners.2 {
        anomalies.push(Anomaly {
            kind: "listener not back after the faults",
            detail: detail.clone(),
        });
    }
    for error in tally.errors.lock().expect("lock").iter() {
        anomalies.push(Anomaly {
            kind: "fault could not be undone",
            detail: error.clone(),
        });
    }
    let mut by_status = [0; 6];
    for row in &rows {
        by_status[row.status.clamp(0, 5) as usize] += 1;
    }
    let operations = history.counts.operations();
    if let Some(seen) = &no_standby {
        if patroni
            .as_ref()
            .is_some_and(|p| p.replication == Replication::Strict)
            && seen.first_ok
        {
            anomalies.push(Anomaly {
                kind: "acknowledged with no standby (strict mode)",
                detail: seen.first.clone(),
            });
        }
        if !seen.first_ok && !seen.replayed {
            anomalies.push(Anomaly {
                kind: "a create committed while no standby ran was lost",
                detail: format!("first {}; retry {}", seen.first, seen.retry),
            });
        }
    }
    if let Some(seen) = &lost_write {
        for detail in &seen.anomalies {
            anomalies.push(Anomaly {
                kind: "lost write answered wrong",
                detail: detail.clone(),
            });
        }
    }
    // Lost commits explain some anomalies on an asynchronous cluster; the
    // rest (the probes' above all) fail a run whatever the replication.
    let lossy = patroni
        .as_ref()
        .is_some_and(|p| p.replication == Replication::Async);
    let failing = anomalies
        .iter()
        .filter(|a| !(lossy && checker::LOST_COMMITS_EXPLAIN.contains(&a.kind)))
        .count();
    let short_of_failovers = patroni.is_some() && failovers() < plan.min_failovers;
    let shortfall = (operations < plan.min_operations
        || tally.disruptive() < plan.min_faults
        || short_of_failovers)
        .then(|| {
            format!(
                "{operations} operations, {} faults and {} failovers in {:.0} s, short of {}, {} and {}",
                tally.disruptive(),
                failovers(),
                elapsed.as_secs_f64(),
                plan.min_operations,
                plan.min_faults,
                if patroni.is_some() { plan.min_failovers } else { 0 }
            )
        });
    let keep = args.keep || !anomalies.is_empty();
    if let Some(patroni) = &patroni {
        if keep {
            patroni.keep();
            println!("chaos {label}: kept the cluster's folder {}", patroni.dir());
        } else {
            patroni.unkeep();
        }
    }
    let report = Report {
        label: label.clone(),
        instances: count,
        elapsed,
        drained_in,
        history,
        tally,
        tasks: rows.len(),
        by_status,
        anomalies,
        shortfall,
        no_standby,
        no_primary,
        lost_write,
        failing,
        listeners: (listeners.0, listeners.1),
    };
    drop(work);
    let cluster = Arc::try_unwrap(cluster).map_err(|_| "the cluster is still in use")?;
    if keep {
        match &cluster.database {
            Database::Postgres { name, .. } => println!(
                "chaos {label}: kept database {name} and the logs in {}",
                dir.display()
            ),
            Database::Sqlite { path, .. } => {
                println!("chaos {label}: kept {}", path.display())
            }
        }
    } else {
        cluster.database.drop_database().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}

/// The create attempts' answers by kind: OK, each refusal's code, each
/// unknown outcome's cause.
fn answer_tally(history: &History) -> String {
    let mut tally = std::collections::BTreeMap::<String, u64>::new();
    for attempt in history.creates.lock().expect("lock").iter() {
        let kind = match &attempt.answer {
            Answer::Ok(created) if created.replayed => "OK (replayed)".to_owned(),
            Answer::Ok(_) => "OK".to_owned(),
            Answer::Refused(code, _) => format!("{code:?}"),
            Answer::Unknown(why) => why.split(':').next().unwrap_or(why).to_owned(),
        };
        *tally.entry(kind).or_default() += 1;
    }
    tally
        .iter()
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_report(report: &Report, plan: Plan) {
    let c = &report.history.counts;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let name = &report.label;
    println!(
        "== chaos {name}: {} instance(s), {:.0} s of faults, drained in {:.1} s",
        report.instances,
        report.elapsed.as_secs_f64(),
        report.drained_in.as_secs_f64()
    );
    println!(
        "operations: {} (minimum {})",
        c.operations(),
        plan.min_operations
    );
    println!(
        "  creates: {} ({} keyless, {} with a reused key), {} attempts; {} acknowledged, {} given up unknown",
        n(&c.creates),
        n(&c.keyless),
        n(&c.variants),
        n(&c.create_attempts),
        n(&c.acknowledged),
        n(&c.abandoned)
    );
    println!(
        "  workers: {} lease calls granting {} leases; {} completions, {} failures, {} renewals, {} leases abandoned (worker died), {} held past their end (worker stalled)",
        n(&c.lease_calls),
        n(&c.leases),
        n(&c.completes),
        n(&c.fails),
        n(&c.renews),
        n(&c.deaths),
        n(&c.stalls)
    );
    println!("  create answers: {}", answer_tally(&report.history));
    let s = report.by_status;
    println!(
        "  tasks stored: {} ({} succeeded, {} failed, {} queued, {} running)",
        report.tasks, s[3], s[4], s[1], s[2]
    );
    println!(
        "faults: {} besides cleanups and key rotations (minimum {}); cleanup deleted {} records",
        report.tally.disruptive(),
        plan.min_faults,
        report.tally.cleaned.lock().expect("lock")
    );
    for (fault, count) in report.tally.injected.lock().expect("lock").iter() {
        println!("  {count:>5}  {}", fault.name());
    }
    println!("  {:>5}  client cancels mid-call", n(&c.client_cancels));
    let failovers = report.tally.failovers.load(Ordering::SeqCst);
    if failovers > 0 || report.label.starts_with("patroni") {
        println!(
            "  failovers: {failovers} (minimum {}); {} killed primaries restarted in place instead",
            plan.min_failovers,
            report.tally.restarted_in_place.load(Ordering::SeqCst)
        );
        for line in report.tally.cluster_log.lock().expect("lock").iter() {
            for line in line
                .lines()
                .filter(|l| l.contains(" in ") || l.contains("cut for"))
            {
                println!("         {}", line.trim_start_matches("patroni-cluster: "));
            }
        }
    }
    if report.listeners.0 > 0 {
        println!(
            "  listeners: lost the database {} times, listening again {} times",
            report.listeners.0, report.listeners.1
        );
    }
    if let Some(seen) = &report.no_primary {
        println!(
            "  with no primary: NOT_SERVING {:.1} s after the kill; an instance started then served {:.1} s later ({})",
            seen.not_serving_after.as_secs_f64(),
            seen.serving_after.as_secs_f64(),
            seen.failover
        );
    }
    if let Some(seen) = &report.lost_write {
        println!("  a create while replication was cut: {}", seen.first);
        println!(
            "  retried after the failover: {}; acknowledged and lost: {}",
            seen.retries.join(", "),
            if seen.lost { "yes" } else { "no" }
        );
    }
    if let Some(seen) = &report.no_standby {
        println!(
            "  with no standby running, a create answered: {}",
            seen.first
        );
        println!(
            "  its retry once a standby was back answered: {}",
            seen.retry
        );
    }
    if report.anomalies.is_empty() {
        println!("anomalies: none");
    } else {
        let mut kinds = std::collections::BTreeMap::<&str, Vec<&Anomaly>>::new();
        for a in &report.anomalies {
            kinds.entry(a.kind).or_default().push(a);
        }
        if report.failing < report.anomalies.len() {
            println!(
                "anomalies: {} ({} explained by lost commits, {} not)",
                report.anomalies.len(),
                report.anomalies.len() - report.failing,
                report.failing
            );
        } else {
            println!("anomalies: {}", report.anomalies.len());
        }
        for (kind, list) in kinds {
            println!("  {:>5}  {kind}", list.len());
            for a in list.iter().take(5) {
                println!("         {}", a.detail);
            }
        }
    }
    if let Some(shortfall) = &report.shortfall {
        println!("too short a run: {shortfall}");
    }
}
