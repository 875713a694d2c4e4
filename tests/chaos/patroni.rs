//! A PostgreSQL cluster under Patroni for the failover runs: etcd, three
//! PostgreSQL 15 nodes and haproxy on 127.0.0.1:5000 routing to the
//! primary, brought up and driven through `scripts/patroni-cluster`, and
//! stopped when dropped.

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
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

    /// Starts a subcommand of the script on this cluster, reading its log
    /// (standard error) as it comes.
    pub(crate) fn spawn(&self, args: &[&str]) -> Result<Running, String> {
        use tokio::io::AsyncBufReadExt;

        let mut child = Command::new(SCRIPT)
            .args(args)
            .env("PATRONI_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("run {SCRIPT}: {e}"))?;
        let stderr = child.stderr.take().ok_or("no standard error to read")?;
        let (sender, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Running {
            child,
            lines,
            log: Vec::new(),
            what: args.join(" "),
        })
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
    let request = |deadline| probe_request(cluster, "standby-missing", &key, deadline);
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

/// What [`start_without_primary`] saw.
pub(crate) struct NoPrimary {
    /// How long after the primary's node was killed another instance's
    /// health check said NOT_SERVING.
    pub(crate) not_serving_after: Duration,
    /// How long the instance started meanwhile took to serve.
    pub(crate) serving_after: Duration,
    /// What the cluster's script said of the failover.
    pub(crate) failover: String,
}

/// The primary's whole node killed: while no node is primary, a running
/// instance's health check must say NOT_SERVING, and an instance started
/// then must wait for the new primary and serve (no restart by hand).
pub(crate) async fn start_without_primary(
    cluster: &Cluster,
    patroni: Arc<Patroni>,
) -> Result<NoPrimary, String> {
    use tonic_health::pb::health_check_response::ServingStatus;

    let (watcher, starting) = (&cluster.instances[0], &cluster.instances[2]);
    starting.kill().await;
    let killed = Instant::now();
    let failover = tokio::spawn({
        let patroni = patroni.clone();
        async move { patroni.run(&["kill-node"]).await }
    });
    // The outage, as the running instance reports it.
    let not_serving_after = loop {
        if watcher.health().await == Some(ServingStatus::NotServing) {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(30) {
            let _ = failover.await;
            let _ = starting.spawn().await;
            return Err(
                "instance 0 answered SERVING all through the 30 s after the primary's node was killed"
                    .into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let spawned = Instant::now();
    starting.spawn().await?;
    let failover = failover
        .await
        .map_err(|e| format!("the kill-node task: {e}"))??
        .unwrap_or_default();
    starting.wait_serving(Duration::from_secs(90)).await?;
    let serving_after = spawned.elapsed();
    watcher.wait_serving(Duration::from_secs(30)).await?;
    Ok(NoPrimary {
        not_serving_after,
        serving_after,
        failover: failover
            .lines()
            .filter(|l| l.contains(" in "))
            .map(|l| l.trim_start_matches("patroni-cluster: "))
            .collect(),
    })
}

/// What [`lost_write`] saw.
pub(crate) struct LostWrite {
    /// What the create sent while the primary's replication was cut
    /// answered.
    pub(crate) first: String,
    /// Whether that answer was OK and its task is gone: an acknowledged
    /// create lost.
    pub(crate) lost: bool,
    /// What the retries through each instance answered, in order.
    pub(crate) retries: Vec<String>,
    /// Broken promises: instances that disagree, a task the database does
    /// not hold, an acknowledged create lost where the replication allows
    /// none.
    pub(crate) anomalies: Vec<String>,
}

/// A write kept off the standbys, then the primary lost: its replication
/// cut (walsenders SIGSTOPped, so that not even the WAL already in the
/// socket arrives), a create through instance A (and its replay, from A's
/// memory), the primary killed while still cut, a standby promoted. Then
/// the same key is retried through A and through B, until both answer:
/// they must give one answer, a task the new primary holds. With
/// asynchronous replication the first create was acknowledged and is lost
/// (the retries create it anew); with synchronous replication it waited
/// for a standby and was never acknowledged, so nothing acknowledged is
/// lost. The probe's task is deleted afterwards.
pub(crate) async fn lost_write(cluster: &Cluster, patroni: &Patroni) -> Result<LostWrite, String> {
    let key = Uuid::new_v4().to_string();
    let request = |deadline| probe_request(cluster, "lost-write", &key, deadline);
    let client = |index: usize| TaskServiceClient::new(cluster.instances[index].channel.clone());
    let answer = |outcome: Result<
        tonic::Response<oncely_client::proto::tasks_v1::Task>,
        tonic::Status,
    >| match outcome {
        Ok(response) => {
            let replayed = response
                .metadata()
                .get(IDEMPOTENT_REPLAYED)
                .is_some_and(|v| v == "true");
            Ok((response.into_inner().task_id, replayed))
        }
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    };

    // The cut lasts long enough for the create and its replay, and ends
    // with the kill.
    let mut script = patroni.spawn(&["cut-and-kill-primary", "4"])?;
    script
        .wait_for_line("cut for", Duration::from_secs(120))
        .await?;
    let first = answer(client(0).create_task(request(Duration::from_secs(2))).await);
    let replay = answer(client(0).create_task(request(Duration::from_secs(2))).await);
    let failover = script.finish().await?;

    // Retried through A, B, then A again, each until it answers.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut retries = Vec::new();
    let mut answers = Vec::new();
    for index in [0, 1, 0] {
        loop {
            match answer(
                client(index)
                    .create_task(request(Duration::from_secs(5)))
                    .await,
            ) {
                Ok((task_id, replayed)) => {
                    retries.push(format!(
                        "instance {index}: task {task_id}{}",
                        if replayed { " (replayed)" } else { "" }
                    ));
                    answers.push(task_id);
                    break;
                }
                Err(why) if Instant::now() > deadline => {
                    return Err(format!(
                        "instance {index} still answered {why} 90 s after the failover"
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    let mut anomalies = Vec::new();
    let final_task = answers[0].clone();
    if answers.iter().any(|a| *a != final_task) {
        anomalies.push(format!(
            "the instances answered one key with different tasks after the failover: {}",
            retries.join("; ")
        ));
    }
    let held = cluster.database.holds_task(&final_task).await?;
    if !held {
        anomalies.push(format!(
            "task {final_task} was answered after the failover, but the database does not hold it"
        ));
    }
    let lost = matches!(&first, Ok((task_id, _)) if *task_id != final_task);
    if lost && patroni.replication != Replication::Async {
        anomalies.push(format!(
            "an acknowledged create was lost with {} replication",
            patroni.replication.name()
        ));
    }
    for task_id in answers.iter().collect::<std::collections::BTreeSet<_>>() {
        if cluster.database.holds_task(task_id).await? {
            cluster.database.delete_task(task_id).await?;
        }
    }
    let describe = |outcome: &Result<(String, bool), String>| match outcome {
        Ok((task_id, replayed)) => format!(
            "OK with task {task_id}{}",
            if *replayed { " (replayed)" } else { "" }
        ),
        Err(why) => why.clone(),
    };
    Ok(LostWrite {
        first: format!(
            "{}, its replay through the same instance {} ({failover})",
            describe(&first),
            describe(&replay)
        ),
        lost,
        retries,
        anomalies,
    })
}

/// A subcommand of the script running, its log read as it comes.
pub(crate) struct Running {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    log: Vec<String>,
    what: String,
}

impl Running {
    /// Waits until the script logs a line containing `text`.
    pub(crate) async fn wait_for_line(
        &mut self,
        text: &str,
        within: Duration,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    let found = line.contains(text);
                    self.log.push(line);
                    if found {
                        return Ok(());
                    }
                }
                Ok(None) => {
                    return Err(format!(
                        "patroni-cluster {} ended without logging {text:?}: {}",
                        self.what,
                        self.log.join("; ")
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "patroni-cluster {} did not log {text:?} within {within:?}",
                        self.what
                    ));
                }
            }
        }
    }

    /// Waits for the script to end; its last line, or why it failed.
    pub(crate) async fn finish(mut self) -> Result<String, String> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| format!("patroni-cluster {}: {e}", self.what))?;
        while let Some(line) = self.lines.recv().await {
            self.log.push(line);
        }
        let last = self
            .log
            .last()
            .map(|l| l.trim_start_matches("patroni-cluster: ").to_owned())
            .unwrap_or_default();
        if status.success() {
            Ok(last)
        } else {
            Err(format!(
                "patroni-cluster {}: {status}: {}",
                self.what,
                self.log.join("; ")
            ))
        }
    }
}

/// A probe's create: its own action and agent, `key` as its idempotency
/// key, sent through either agent key with `deadline`.
fn probe_request(
    cluster: &Cluster,
    probe: &str,
    key: &str,
    deadline: Duration,
) -> tonic::Request<CreateTaskRequest> {
    let parameters = serde_json::json!({ "probe": probe, "key": key });
    let mut message = tonic::Request::new(CreateTaskRequest {
        agent_id: "chaos-agent-0".into(),
        action: format!("chaos.{probe}"),
        parameters: Some(json::to_struct(parameters).expect("an object")),
    });
    message.set_timeout(deadline);
    message.metadata_mut().insert(
        IDEMPOTENCY_KEY,
        key.parse().expect("a UUID is ASCII metadata"),
    );
    authorized(message, &cluster.keys.agent(&mut fastrand::Rng::new()))
}
