//! A PostgreSQL cluster under Patroni for the failover runs: etcd, three
//! PostgreSQL 15 nodes and haproxy on 127.0.0.1:5000 routing to the
//! primary, brought up and driven through `scripts/patroni-cluster`, and
//! stopped when dropped.

use std::{
    process::Stdio,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use oncely_client::{
    json,
    metadata::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED},
    proto::tasks_v1::{CreateTaskRequest, task_service_client::TaskServiceClient},
};
use tokio::process::Command;
use uuid::Uuid;

use crate::cluster::{Cluster, authorized};

/// The script that runs the cluster.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/patroni-cluster");

/// Where the script remembers the last cluster it brought up.
const LAST: &str = "/tmp/patroni-cluster.last";

/// The cluster's primary, through haproxy.
pub(crate) const URL: &str = "postgres://postgres@127.0.0.1:5000/postgres";

/// How the primary replicates, as Patroni's dynamic configuration sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Replication {
    /// `synchronous_mode` and `synchronous_mode_strict`: a commit returns
    /// once a standby has it, and waits while there is none.
    Strict,
    /// `synchronous_mode` alone: with no standby left the primary goes on
    /// by itself.
    Sync,
    /// Asynchronous: a commit returns before any standby has it.
    Async,
}

impl Replication {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Replication::Strict => "strict",
            Replication::Sync => "sync",
            Replication::Async => "async",
        }
    }
}

/// A running cluster.
pub(crate) struct Patroni {
    dir: String,
    pub(crate) replication: Replication,
    /// Keep the cluster's folder (its logs) when it is stopped.
    keep: AtomicBool,
}

impl Patroni {
    /// Brings a cluster up and waits until it is healthy (a primary, two
    /// streaming replicas, haproxy routing to the primary).
    pub(crate) async fn up(replication: Replication) -> Result<Self, String> {
        let output = Command::new(SCRIPT)
            .args(["up", &format!("--{}", replication.name())])
            .env_remove("PATRONI_DIR")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("run {SCRIPT}: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let dir = stdout
            .lines()
            .find_map(|line| line.strip_prefix("PATRONI_DIR="))
            .map(str::to_owned);
        match dir {
            Some(dir) if output.status.success() => Ok(Self {
                dir,
                replication,
                keep: AtomicBool::new(false),
            }),
            _ => {
                // Stop whatever did start (the script names its folder in
                // LAST before starting anything).
                if let Ok(dir) = std::fs::read_to_string(LAST) {
                    drop(Self {
                        dir: dir.trim().to_owned(),
                        replication,
                        keep: AtomicBool::new(true),
                    });
                }
                Err(format!(
                    "patroni-cluster up: {}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        }
    }

    /// Runs a subcommand of the script on this cluster; its log lines (the
    /// script's standard error), or why it failed. Exit status 3 (a
    /// primary restarted in place rather than failed over) is `Ok(None)`.
    pub(crate) async fn run(&self, args: &[&str]) -> Result<Option<String>, String> {
        let output = Command::new(SCRIPT)
            .args(args)
            .env("PATRONI_DIR", &self.dir)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("run {SCRIPT}: {e}"))?;
        let log = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        match output.status.code() {
            Some(0) => Ok(Some(log)),
            Some(3) => Ok(None),
            _ => Err(format!(
                "patroni-cluster {}: {}: {log} (logs in {})",
                args.join(" "),
                output.status,
                self.dir
            )),
        }
    }

    /// Keeps the cluster's folder when it is stopped, for its logs.
    pub(crate) fn keep(&self) {
        self.keep.store(true, Ordering::SeqCst);
    }

    /// Undoes [`keep`](Self::keep).
    pub(crate) fn unkeep(&self) {
        self.keep.store(false, Ordering::SeqCst);
    }

    pub(crate) fn dir(&self) -> &str {
        &self.dir
    }
}

impl Drop for Patroni {
    fn drop(&mut self) {
        let keep = if self.keep.load(Ordering::SeqCst) {
            "1"
        } else {
            "0"
        };
        let _ = std::process::Command::new(SCRIPT)
            .arg("down")
            .env("PATRONI_DIR", &self.dir)
            .env("PATRONI_KEEP", keep)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The deadline of the create sent while no standby runs: longer than the
/// instances' `STATEMENT_TIMEOUT` (10 s), which must not cut a commit's
/// wait for a standby short (PostgreSQL would then return the commit as
/// done, with a warning, though no standby has it).
const NO_STANDBY_DEADLINE: Duration = Duration::from_secs(14);

/// What [`standby_missing`] saw.
pub(crate) struct NoStandby {
    /// What the create sent with both standbys down was answered, and
    /// after how long.
    pub(crate) first: String,
    /// Whether that answer was OK (in strict mode, an anomaly).
    pub(crate) first_ok: bool,
    /// What its retry answered once a standby was back.
    pub(crate) retry: String,
    /// Whether the retry replayed the task the first attempt committed.
    pub(crate) replayed: bool,
}

/// Both standbys killed: a create through the first instance either waits
/// and is answered with an error (strict mode: never OK, since no standby
/// has it) or, in sync mode, goes through once Patroni lets the primary go
/// on alone. The standbys then start again, and a retry with the same key
/// must answer the task the first attempt committed (replayed), not a new
/// one: the first answer said nothing was sure, and indeed it was not. The
/// probe's task is deleted afterwards, so the workload's checker never sees
/// it.
pub(crate) async fn standby_missing(
    cluster: &Cluster,
    patroni: &Patroni,
) -> Result<NoStandby, String> {
    let key = Uuid::new_v4().to_string();
    let request = |deadline: Duration| {
        let parameters = serde_json::json!({ "probe": "standby-missing", "key": key });
        let mut message = tonic::Request::new(CreateTaskRequest {
            agent_id: "chaos-agent-0".into(),
            action: "chaos.standby-missing".into(),
            parameters: Some(json::to_struct(parameters).expect("an object")),
        });
        message.set_timeout(deadline);
        message.metadata_mut().insert(
            IDEMPOTENCY_KEY,
            key.parse().expect("a UUID is ASCII metadata"),
        );
        authorized(message, &cluster.keys.agent(&mut fastrand::Rng::new()))
    };
    let mut client = TaskServiceClient::new(cluster.instances[0].channel.clone());

    patroni.run(&["kill-replicas"]).await?;
    let started = Instant::now();
    let first = tokio::time::timeout(
        NO_STANDBY_DEADLINE + Duration::from_secs(1),
        client.create_task(request(NO_STANDBY_DEADLINE)),
    )
    .await;
    let took = started.elapsed().as_secs_f64();
    let (first, first_ok) = match first {
        Err(_) => (format!("no answer within {took:.1} s"), false),
        Ok(Ok(answer)) => (
            format!(
                "OK after {took:.1} s with task {}",
                answer.get_ref().task_id
            ),
            true,
        ),
        Ok(Err(status)) => (
            format!(
                "{:?} after {took:.1} s: {}",
                status.code(),
                status.message()
            ),
            false,
        ),
    };
    patroni.run(&["start-nodes"]).await?;
    patroni.run(&["wait-healthy"]).await?;

    // The retry, until an instance answers (it may still be reconnecting).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (retry, replayed, task_id) = loop {
        match client.create_task(request(Duration::from_secs(5))).await {
            Ok(answer) => {
                let replayed = answer
                    .metadata()
                    .get(IDEMPOTENT_REPLAYED)
                    .is_some_and(|v| v == "true");
                let task_id = answer.into_inner().task_id;
                break (
                    format!(
                        "OK{} with task {task_id}",
                        if replayed { " (replayed)" } else { "" }
                    ),
                    replayed,
                    task_id,
                );
            }
            Err(status) if Instant::now() > deadline => {
                return Err(format!(
                    "the retry after the standbys came back still answered {:?}: {}",
                    status.code(),
                    status.message()
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    cluster.database.delete_task(&task_id).await?;
    Ok(NoStandby {
        first,
        first_ok,
        retry,
        replayed,
    })
}
