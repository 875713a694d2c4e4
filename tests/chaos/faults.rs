//! Faults, injected on a schedule while the workload runs. Each fault runs
//! as a task of its own, so faults overlap; two never act on one instance
//! at once, and PostgreSQL restarts one at a time.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use oncely_client::proto::tasks_v1::{CleanupRequest, admin_client::AdminClient};
use tokio::task::JoinSet;

use crate::cluster::{Cluster, Store, authorized};

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
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut first_round = kinds.clone();
    rng.shuffle(&mut first_round);
    let mut running = JoinSet::new();
    while !stop.load(Ordering::SeqCst) {
        let wait = rng.u64(gap.0.as_millis() as u64..gap.1.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let fault = first_round
            .pop()
            .unwrap_or_else(|| kinds[rng.usize(..kinds.len())]);
        *tally
            .injected
            .lock()
            .expect("lock")
            .entry(fault)
            .or_default() += 1;
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
