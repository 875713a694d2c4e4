//! Faults, injected on a schedule while the workload runs. Each fault runs
//! as a task of its own, so faults overlap; two never act on one instance
//! at once, and PostgreSQL restarts one at a time.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use oncely_client::proto::tasks_v1::{CleanupRequest, admin_client::AdminClient};
use tokio::task::JoinSet;

use crate::{
    cluster::{Cluster, Store, authorized},
    patroni::Patroni,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fault {
    /// SIGKILL an instance, restart it after a moment.
    Kill,
    /// SIGSTOP an instance for up to two seconds (a long GC pause, a
    /// stalled VM): calls time out while it still holds their work.
    Pause,
    /// Cut an instance's connections to PostgreSQL, refuse new ones for a
    /// moment.
    DbCut,
    /// Hold every byte between an instance and PostgreSQL for up to three
    /// seconds.
    DbStall,
    /// Restart PostgreSQL itself.
    PgRestart,
    /// An Admin/Cleanup call, alongside everything else.
    Cleanup,
    /// `oncely keys rotate` of an agent key: the agents move to the new
    /// token once every instance takes it, the old one works for a grace
    /// period meanwhile, and retries go on under their idempotency keys.
    RotateKey,
    /// `patronictl switchover`: the primary stops cleanly, a standby takes
    /// over.
    Switchover,
    /// `patronictl failover`: a standby is promoted at once.
    Failover,
    /// kill -9 of the primary's postmaster; Patroni fails over.
    KillPrimary,
    /// Replication cut for a moment, then kill -9 of the primary's
    /// postmaster: the standbys miss what it committed meanwhile (in the
    /// synchronous modes, nothing acknowledged).
    CutAndKillPrimary,
    /// kill -9 of the primary's Patroni and postgres (its machine died):
    /// a standby takes over once the leader key expires.
    KillNode,
    /// Nothing reaches the standbys for a moment (the network between
    /// them and the primary cut): synchronous commits wait.
    CutReplication,
}

impl Fault {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9 and restart an instance",
            Fault::Pause => "pause an instance (SIGSTOP)",
            Fault::DbCut => "cut database connections",
            Fault::DbStall => "stall database connections",
            Fault::PgRestart => "restart PostgreSQL",
            Fault::Cleanup => "cleanup in parallel",
            Fault::RotateKey => "rotate an agent's API key",
            Fault::Switchover => "patronictl switchover",
            Fault::Failover => "patronictl failover",
            Fault::KillPrimary => "kill -9 the primary's postmaster (failover)",
            Fault::CutAndKillPrimary => {
                "cut replication, then kill -9 the primary's postmaster (failover)"
            }
            Fault::KillNode => "kill -9 the primary's whole node (failover)",
            Fault::CutReplication => "cut replication to the standbys",
        }
    }

    /// The faults that apply to `store`.
    pub(crate) fn kinds(store: Store, restart_postgres: bool) -> Vec<Fault> {
        match store {
            Store::Postgres => {
                let mut kinds = vec![
                    Fault::Kill,
                    Fault::Pause,
                    Fault::DbCut,
                    Fault::DbStall,
                    Fault::Cleanup,
                    Fault::RotateKey,
                ];
                if restart_postgres {
                    kinds.push(Fault::PgRestart);
                }
                kinds
            }
            Store::Sqlite => vec![Fault::Kill, Fault::Pause, Fault::Cleanup, Fault::RotateKey],
        }
    }

    /// The faults of a Patroni cluster, injected one at a time beside the
    /// others.
    pub(crate) fn of_patroni() -> Vec<Fault> {
        vec![
            Fault::Switchover,
            Fault::Failover,
            Fault::KillPrimary,
            Fault::CutAndKillPrimary,
            Fault::KillNode,
            Fault::CutReplication,
        ]
    }

    /// Whether the fault hands the primary to another node.
    fn is_failover(self) -> bool {
        matches!(
            self,
            Fault::Switchover
                | Fault::Failover
                | Fault::KillPrimary
                | Fault::CutAndKillPrimary
                | Fault::KillNode
        )
    }
}

/// What the faults did.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) injected: Mutex<BTreeMap<Fault, u64>>,
    /// Idempotency records cleanup deleted.
    pub(crate) cleaned: Mutex<i64>,
    /// Things the harness failed to do (a restart that did not come up):
    /// reported as anomalies, since the run no longer means what it says.
    pub(crate) errors: Mutex<Vec<String>>,
    /// Primaries handed to another node, as the cluster's script saw it.
    pub(crate) failovers: AtomicU64,
    /// Primaries killed that Patroni restarted in place instead (no
    /// healthy standby was a candidate yet).
    pub(crate) restarted_in_place: AtomicU64,
    /// What the cluster's script said of each fault, in order.
    pub(crate) cluster_log: Mutex<Vec<String>>,
}

impl Tally {
    /// The faults that disrupt something: all but cleanups and key
    /// rotations, which run beside the rest but are not counted toward a
    /// run's minimum.
    pub(crate) fn disruptive(&self) -> u64 {
        self.injected
            .lock()
            .expect("lock")
            .iter()
            .filter(|(fault, _)| !matches!(fault, Fault::Cleanup | Fault::RotateKey))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Which fault comes next: each kind once, in random order, then any at
/// random.
struct Schedule {
    kinds: Vec<Fault>,
    first_round: Vec<Fault>,
    rng: fastrand::Rng,
}

impl Schedule {
    fn new(kinds: Vec<Fault>, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut first_round = kinds.clone();
        rng.shuffle(&mut first_round);
        Self {
            kinds,
            first_round,
            rng,
        }
    }

    /// After a pause (random within `gap`), the next fault, counted in
    /// `tally`; `None` once `stop` is set.
    async fn next(
        &mut self,
        gap: (Duration, Duration),
        stop: &AtomicBool,
        tally: &Tally,
    ) -> Option<Fault> {
        let wait = self
            .rng
            .u64(gap.0.as_millis() as u64..gap.1.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        let fault = self
            .first_round
            .pop()
            .unwrap_or_else(|| self.kinds[self.rng.usize(..self.kinds.len())]);
        *tally
            .injected
            .lock()
            .expect("lock")
            .entry(fault)
            .or_default() += 1;
        Some(fault)
    }
}

/// Injects faults, one every `gap` (random within it), until `stop`; the
/// first round injects each kind once, in random order. Waits for the
/// faults in progress before returning.
pub(crate) async fn run(
    cluster: Arc<Cluster>,
    kinds: Vec<Fault>,
    gap: (Duration, Duration),
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut schedule = Schedule::new(kinds, seed);
    let mut running = JoinSet::new();
    while !stop.load(Ordering::SeqCst) {
        let Some(fault) = schedule.next(gap, &stop, &tally).await else {
            break;
        };
        let rng = &mut schedule.rng;
        let (cluster, tally, seed) = (cluster.clone(), tally.clone(), rng.u64(..));
        running.spawn(async move {
            if let Err(error) = inject(&cluster, fault, &tally, seed).await {
                tally.errors.lock().expect("lock").push(error);
            }
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

/// Injects the cluster's faults one after another until `stop`, a gap
/// (random within `gap`) after the cluster is healthy again; the first
/// round injects each kind once, in random order. The instance faults of
/// [`run`] go on meanwhile.
pub(crate) async fn run_patroni(
    patroni: Arc<Patroni>,
    gap: (Duration, Duration),
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut schedule = Schedule::new(Fault::of_patroni(), seed);
    while !stop.load(Ordering::SeqCst) {
        if let Err(error) = patroni.run(&["wait-healthy"]).await {
            tally.errors.lock().expect("lock").push(error);
            return;
        }
        let Some(fault) = schedule.next(gap, &stop, &tally).await else {
            break;
        };
        let cut = format!("{:.1}", schedule.rng.u64(500..4000) as f64 / 1000.0);
        let args: &[&str] = match fault {
            Fault::Switchover => &["switchover"],
            Fault::Failover => &["failover"],
            Fault::KillPrimary => &["kill-primary"],
            Fault::CutAndKillPrimary => &["cut-and-kill-primary", &cut],
            Fault::KillNode => &["kill-node"],
            _ => &["cut-replication", &cut],
        };
        match patroni.run(args).await {
            Ok(Some(log)) => {
                if fault.is_failover() {
                    tally.failovers.fetch_add(1, Ordering::SeqCst);
                }
                tally.cluster_log.lock().expect("lock").push(log);
            }
            Ok(None) => {
                tally.restarted_in_place.fetch_add(1, Ordering::SeqCst);
            }
            Err(error) => {
                tally.errors.lock().expect("lock").push(error);
                return;
            }
        }
    }
}

async fn inject(cluster: &Cluster, fault: Fault, tally: &Tally, seed: u64) -> Result<(), String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let instance = &cluster.instances[rng.usize(..cluster.instances.len())];
    let millis = |rng: &mut fastrand::Rng, lo: u64, hi: u64| Duration::from_millis(rng.u64(lo..hi));
    match fault {
        Fault::Kill => {
            let _busy = instance.busy.lock().await;
            instance.kill().await;
            tokio::time::sleep(millis(&mut rng, 100, 1500)).await;
            instance.spawn().await?;
            instance.wait_serving(Duration::from_secs(60)).await?;
        }
        Fault::Pause => {
            let _busy = instance.busy.lock().await;
            instance.signal("STOP").await;
            tokio::time::sleep(millis(&mut rng, 300, 2000)).await;
            instance.signal("CONT").await;
        }
        Fault::DbCut => {
            let _busy = instance.busy.lock().await;
            let proxy = instance.proxy.as_ref().ok_or("no proxy to cut")?;
            proxy.cut();
            tokio::time::sleep(millis(&mut rng, 0, 1000)).await;
            proxy.restore();
        }
        Fault::DbStall => {
            let _busy = instance.busy.lock().await;
            let proxy = instance.proxy.as_ref().ok_or("no proxy to stall")?;
            proxy.stall(true);
            tokio::time::sleep(millis(&mut rng, 500, 3000)).await;
            proxy.stall(false);
        }
        Fault::PgRestart => {
            let _postgres = cluster.postgres.lock().await;
            restart_postgres().await?;
        }
        Fault::RotateKey => {
            cluster.keys.rotate(&cluster.instances, &mut rng).await?;
        }
        Fault::Switchover
        | Fault::Failover
        | Fault::KillPrimary
        | Fault::CutAndKillPrimary
        | Fault::KillNode
        | Fault::CutReplication => {
            return Err(format!("{} is injected by run_patroni", fault.name()));
        }
        Fault::Cleanup => {
            let mut admin = AdminClient::new(instance.channel.clone());
            let mut request = tonic::Request::new(CleanupRequest { older_than: None });
            request.set_timeout(Duration::from_secs(5));
            let request = authorized(request, &cluster.keys.admin);
            // A cleanup that fails under other faults is retried by the
            // next one, as cron would.
            if let Ok(Ok(answer)) =
                tokio::time::timeout(Duration::from_secs(6), admin.cleanup(request)).await
            {
                *tally.cleaned.lock().expect("lock") += answer.into_inner().deleted;
            }
        }
    }
    Ok(())
}

/// The cluster of this machine's PostgreSQL, for `pg_ctlcluster`: the
/// newest version under /etc/postgresql.
fn postgres_version() -> Option<String> {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    versions.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
    versions.pop()
}

/// Whether this machine can restart its PostgreSQL with `pg_ctlcluster`.
pub(crate) fn can_restart_postgres() -> bool {
    postgres_version().is_some()
        && std::process::Command::new("pg_ctlcluster")
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok()
}

async fn restart_postgres() -> Result<(), String> {
    let version = postgres_version().ok_or("no PostgreSQL cluster under /etc/postgresql")?;
    pg_ctlcluster(&version, "restart").await
}

async fn pg_ctlcluster(version: &str, action: &str) -> Result<(), String> {
    let output = tokio::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", action])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("pg_ctlcluster: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "pg_ctlcluster {version} main {action}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// Makes sure this machine's PostgreSQL runs after the faults, whatever a
/// restart left behind (one that failed, or was cut short).
pub(crate) async fn ensure_postgres_up() -> Result<(), String> {
    let ready = || async {
        tokio::process::Command::new("pg_isready")
            .args(["-q", "-h", "127.0.0.1"])
            .status()
            .await
            .is_ok_and(|s| s.success())
    };
    if ready().await {
        return Ok(());
    }
    let version = postgres_version().ok_or("no PostgreSQL cluster under /etc/postgresql")?;
    let _ = pg_ctlcluster(&version, "start").await;
    for _ in 0..60 {
        if ready().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err("PostgreSQL did not come back after the faults".into())
}
