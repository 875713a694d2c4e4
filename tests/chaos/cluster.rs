//! The system under test: server instances (the real `oncely` binary) on
//! one database, each behind a TCP proxy to PostgreSQL that faults can cut
//! or stall, and the database itself, read directly by the checker.

use std::{path::PathBuf, process::Stdio, str::FromStr, sync::Mutex, time::Duration};

use sqlx::{
    Connection, PgConnection, PgPool, Row, SqlitePool,
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::SqliteConnectOptions,
};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

use crate::{db_proxy::PgProxy, history::TaskRow};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The binary cargo built beside this harness.
const BINARY: &str = env!("CARGO_BIN_EXE_oncely");

/// The PostgreSQL server used when `DATABASE_URL` is unset.
const DEFAULT_BASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The stores the harness runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Store {
    Postgres,
    Sqlite,
}

impl Store {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Store::Postgres => "postgres",
            Store::Sqlite => "sqlite",
        }
    }
}

/// The lease every worker asks for, short so that expiries happen.
pub(crate) const LEASE: Duration = Duration::from_secs(2);

/// How long a key answers for retries. Keys are used for a shorter time
/// than this (see `workload::KEY_LIFETIME`), and cleanup deletes them after.
const RETENTION: &str = "30s";

/// The database of one run.
pub(crate) enum Database {
    Postgres {
        /// The server's database to create and drop this one from.
        admin: String,
        name: String,
        pool: PgPool,
        /// Where PostgreSQL listens, for the proxies.
        upstream: String,
        /// The URL without host and port, to point at a proxy.
        url_template: Box<PgConnectOptions>,
    },
    Sqlite {
        path: PathBuf,
        pool: SqlitePool,
    },
}

impl Database {
    /// A fresh database: on PostgreSQL, one of its own on the server of
    /// `server` (else `DATABASE_URL`); on SQLite, a file in `dir`.
    pub(crate) async fn create(
        store: Store,
        dir: &std::path::Path,
        server: Option<&str>,
    ) -> Result<Self, String> {
        match store {
            Store::Postgres => {
                let admin = server.map(str::to_owned).unwrap_or_else(|| {
                    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_BASE_URL.to_owned())
                });
                let options = PgConnectOptions::from_str(&admin)
                    .map_err(|e| format!("DATABASE_URL {admin}: {e}"))?;
                let name = format!("oncely_chaos_{}", std::process::id());
                let mut conn = PgConnection::connect_with(&options)
                    .await
                    .map_err(|e| format!("connect to {admin}: {e}"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .map_err(|e| format!("drop database {name}: {e}"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| format!("create database {name}: {e}"))?;
                let target = options.clone().database(&name);
                let pool = PgPoolOptions::new()
                    .max_connections(2)
                    .connect_lazy_with(target.clone());
                Ok(Database::Postgres {
                    upstream: format!("{}:{}", options.get_host(), options.get_port()),
                    admin,
                    name,
                    pool,
                    url_template: Box::new(target),
                })
            }
            Store::Sqlite => {
                let path = dir.join("oncely.db");
                let options = SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true);
                let pool = SqlitePool::connect_lazy_with(options);
                Ok(Database::Sqlite { path, pool })
            }
        }
    }

    /// The `DATABASE_URL` of a server instance; on PostgreSQL, through the
    /// proxy listening on `proxy_port`.
    fn url_for(&self, proxy_port: Option<u16>) -> String {
        match self {
            Database::Postgres {
                url_template, name, ..
            } => {
                let user = url_template.get_username();
                let port = proxy_port.unwrap_or(url_template.get_port());
                format!("postgres://{user}@127.0.0.1:{port}/{name}")
            }
            Database::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
        }
    }

    /// Whether PostgreSQL runs on this machine, so that the harness may
    /// restart it.
    pub(crate) fn is_local_postgres(&self) -> bool {
        matches!(self, Database::Postgres { upstream, .. }
            if upstream.starts_with("127.0.0.1:") || upstream.starts_with("localhost:"))
    }

    /// How many tasks are queued or running.
    pub(crate) async fn unfinished(&self) -> Result<i64, sqlx::Error> {
        const SQL: &str = "SELECT count(*) FROM tasks WHERE status IN (1, 2)";
        match self {
            Database::Postgres { pool, .. } => sqlx::query_scalar(SQL).fetch_one(pool).await,
            Database::Sqlite { pool, .. } => sqlx::query_scalar(SQL).fetch_one(pool).await,
        }
    }

    /// Whether the database holds the task (tried again for a while: after
    /// a failover, the pool's first connections may be to a primary that
    /// is gone).
    pub(crate) async fn holds_task(&self, task_id: &str) -> Result<bool, String> {
        let Database::Postgres { pool, .. } = self else {
            return Err("probes run on PostgreSQL only".into());
        };
        let id = uuid::Uuid::parse_str(task_id).map_err(|e| format!("task id {task_id}: {e}"))?;
        let mut tries = 0;
        loop {
            match sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM tasks WHERE task_id = $1)",
            )
            .bind(id)
            .fetch_one(pool)
            .await
            {
                Ok(held) => return Ok(held),
                Err(error) if tries >= 40 => return Err(format!("read task {task_id}: {error}")),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Deletes a task and its key record (a probe's, not the workload's).
    pub(crate) async fn delete_task(&self, task_id: &str) -> Result<(), String> {
        let Database::Postgres { pool, .. } = self else {
            return Err("probes run on PostgreSQL only".into());
        };
        let id = uuid::Uuid::parse_str(task_id).map_err(|e| format!("task id {task_id}: {e}"))?;
        let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
        for sql in [
            "DELETE FROM idempotency_keys WHERE task_id = $1",
            "DELETE FROM tasks WHERE task_id = $1",
        ] {
            sqlx::query(sql)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| format!("delete probe task {task_id}: {e}"))?;
        }
        tx.commit().await.map_err(|e| e.to_string())
    }

    /// Every task, as stored; tried again for a while (after failovers,
    /// the pool's first connections may be to a primary that is gone).
    pub(crate) async fn tasks(&self) -> Result<Vec<TaskRow>, String> {
        let mut tries = 0;
        loop {
            match self.tasks_once().await {
                Err(error) if tries < 20 => {
                    tries += 1;
                    eprintln!("chaos: reading the tasks: {error}; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                rows => return rows,
            }
        }
    }

    async fn tasks_once(&self) -> Result<Vec<TaskRow>, String> {
        match self {
            Database::Postgres { pool, .. } => read_rows(
                sqlx::query(
                    "SELECT task_id::text, agent_id, action, parameters::text, status::int8, \
                     result::text, attempt::int8 FROM tasks",
                )
                .fetch_all(pool)
                .await,
            ),
            Database::Sqlite { pool, .. } => read_rows(
                sqlx::query(
                    "SELECT task_id, agent_id, action, parameters, status, result, attempt \
                     FROM tasks",
                )
                .fetch_all(pool)
                .await,
            ),
        }
    }

    /// Drops the PostgreSQL database (the SQLite file goes with its folder).
    pub(crate) async fn drop_database(self) {
        if let Database::Postgres {
            admin, name, pool, ..
        } = self
        {
            pool.close().await;
            if let Ok(mut conn) = PgConnection::connect(&admin).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await;
            }
        }
    }
}

fn read_rows<R: Row>(rows: Result<Vec<R>, sqlx::Error>) -> Result<Vec<TaskRow>, String>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    usize: sqlx::ColumnIndex<R>,
{
    rows.map_err(|e| e.to_string())?
        .iter()
        .map(read_row)
        .collect()
}

fn read_row<R: Row>(row: &R) -> Result<TaskRow, String>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    usize: sqlx::ColumnIndex<R>,
{
    let get_text = |i: usize| row.try_get::<String, _>(i).map_err(|e| e.to_string());
    let parse = |text: &str| serde_json::from_str(text).map_err(|e| format!("{e}: {text}"));
    let result = row
        .try_get::<Option<String>, _>(5)
        .map_err(|e| e.to_string())?;
    Ok(TaskRow {
        task_id: get_text(0)?,
        agent_id: get_text(1)?,
        action: get_text(2)?,
        parameters: parse(&get_text(3)?)?,
        status: row.try_get(4).map_err(|e| e.to_string())?,
        result: result.as_deref().map(parse).transpose()?,
        attempt: row.try_get(6).map_err(|e| e.to_string())?,
    })
}

/// One server instance: the binary as a child process, restartable on the
/// same address with the same settings.
pub(crate) struct Instance {
    pub(crate) index: usize,
    env: Vec<(&'static str, String)>,
    pub(crate) log: PathBuf,
    child: tokio::sync::Mutex<Option<Child>>,
    /// Held by a fault while it works on this instance, so that two faults
    /// never act on one process at once.
    pub(crate) busy: tokio::sync::Mutex<()>,
    pub(crate) proxy: Option<PgProxy>,
    pub(crate) channel: Channel,
}

impl Instance {
    /// Starts the process; it serves once [`wait_serving`] says so.
    pub(crate) async fn spawn(&self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("open {}: {e}", self.log.display()))?;
        let child = Command::new(BINARY)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start {BINARY}: {e}"))?;
        *self.child.lock().await = Some(child);
        Ok(())
    }

    /// Waits until the instance answers health checks as SERVING.
    /// Waits until this instance takes `token` (it reloads its keys every
    /// 200 ms; a GetTask of no task answers NOT_FOUND, not
    /// UNAUTHENTICATED), also across a restart or a pause meanwhile.
    pub(crate) async fn wait_accepting(&self, token: &str, within: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut tasks =
                oncely_client::proto::tasks_v1::task_service_client::TaskServiceClient::new(
                    self.channel.clone(),
                );
            let mut request = tonic::Request::new(oncely_client::proto::tasks_v1::GetTaskRequest {
                task_id: uuid::Uuid::nil().to_string(),
            });
            request.set_timeout(Duration::from_millis(500));
            let probe = tokio::time::timeout(
                Duration::from_secs(1),
                tasks.get_task(authorized(request, token)),
            )
            .await;
            if let Ok(Err(status)) = probe
                && status.code() == tonic::Code::NotFound
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "instance {} did not take a rotated key's new token within {within:?}",
                    self.index
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the health check answers now (`None`: no answer within a
    /// second).
    pub(crate) async fn health(&self) -> Option<ServingStatus> {
        let mut health = HealthClient::new(self.channel.clone());
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        request.set_timeout(Duration::from_millis(500));
        match tokio::time::timeout(Duration::from_secs(1), health.check(request)).await {
            Ok(Ok(answer)) => Some(answer.get_ref().status()),
            _ => None,
        }
    }

    pub(crate) async fn wait_serving(&self, within: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut health = HealthClient::new(self.channel.clone());
            let mut request = tonic::Request::new(HealthCheckRequest::default());
            request.set_timeout(Duration::from_millis(500));
            let check = tokio::time::timeout(Duration::from_secs(1), health.check(request)).await;
            if let Ok(Ok(answer)) = check
                && answer.get_ref().status() == ServingStatus::Serving
            {
                return Ok(());
            }
            if let Some(child) = self.child.lock().await.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "instance {} exited while starting ({status}); see {}",
                    self.index,
                    self.log.display()
                ));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "instance {} was not SERVING within {within:?}; see {}",
                    self.index,
                    self.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: the process dies at once, mid-call, mid-transaction.
    pub(crate) async fn kill(&self) {
        if let Some(mut child) = self.child.lock().await.take() {
            let _ = child.kill().await;
        }
    }

    /// Sends `signal` (STOP, CONT, TERM) to the process.
    pub(crate) async fn signal(&self, signal: &str) {
        let pid = self.child.lock().await.as_ref().and_then(Child::id);
        if let Some(pid) = pid {
            let _ = Command::new("kill")
                .args([format!("-{signal}"), pid.to_string()])
                .status()
                .await;
        }
    }

    /// Stops the process gracefully and waits for it.
    pub(crate) async fn stop(&self) {
        self.signal("CONT").await;
        self.signal("TERM").await;
        if let Some(mut child) = self.child.lock().await.take()
            && tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
        {
            let _ = child.kill().await;
        }
    }

    /// Whether the process is gone (killed and not yet restarted).
    pub(crate) async fn is_down(&self) -> bool {
        self.child.lock().await.is_none()
    }
}

/// A port free now for an instance that restarts on it all run long: below
/// the kernel's ephemeral range, so that no outgoing connection (ours to
/// the database among them) can take it while the instance is down.
fn fixed_port() -> Result<u16, String> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (low.saturating_sub(12_000).max(1024), low);
    for _ in 0..200 {
        let port = fastrand::u16(from..to);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(format!("no free port between {from} and {to}"))
}

/// The names of the two agent keys: two replicas of one agent platform,
/// each request sent through either (idempotency keys belong to the agent,
/// not to the key), both acting for every agent of the workload.
const AGENT_KEYS: [&str; 2] = ["chaos-agents-a", "chaos-agents-b"];

/// The agents of the workload (`workload::request_for` names them).
const AGENTS: [&str; 4] = [
    "chaos-agent-0",
    "chaos-agent-1",
    "chaos-agent-2",
    "chaos-agent-3",
];

/// How long a rotated-out agent token keeps working: far longer than any
/// call that picked it before the clients moved to the new one.
const ROTATION_GRACE: &str = "30s";

/// The run's API keys (every instance requires one): the agent keys' tokens
/// as the clients use them now, a worker key and an admin key.
pub(crate) struct Keys {
    agents: Mutex<[String; 2]>,
    pub(crate) worker: String,
    pub(crate) admin: String,
    /// One rotation at a time.
    rotating: tokio::sync::Mutex<()>,
    url: String,
}

impl Keys {
    /// Creates the keys with `oncely keys create` on the database at `url`
    /// (which also migrates it).
    async fn create(url: String) -> Result<Self, String> {
        let mut agent_scope = vec!["--role", "agent"];
        for agent in AGENTS {
            agent_scope.extend(["--agent-id", agent]);
        }
        let mut agents = Vec::new();
        for name in AGENT_KEYS {
            let mut args = vec!["create", "--name", name];
            args.extend(&agent_scope);
            agents.push(keys_command(&url, &args).await?);
        }
        let worker = keys_command(
            &url,
            &["create", "--name", "chaos-workers", "--role", "worker"],
        )
        .await?;
        let admin = keys_command(
            &url,
            &["create", "--name", "chaos-admin", "--role", "admin"],
        )
        .await?;
        let agents: [String; 2] = agents.try_into().map_err(|_| "two agent keys".to_owned())?;
        Ok(Self {
            agents: Mutex::new(agents),
            worker,
            admin,
            rotating: tokio::sync::Mutex::new(()),
            url,
        })
    }

    /// An agent token, either key's.
    pub(crate) fn agent(&self, rng: &mut fastrand::Rng) -> String {
        self.agents.lock().expect("lock")[rng.usize(..AGENT_KEYS.len())].clone()
    }

    /// Rotates one agent key (`oncely keys rotate`, with a grace period),
    /// waits until every instance takes the new token, and moves the
    /// clients to it. Rotations run one at a time, and the next one waits
    /// a moment, so that a token is never dropped while a call uses it.
    pub(crate) async fn rotate(
        &self,
        instances: &[Instance],
        rng: &mut fastrand::Rng,
    ) -> Result<(), String> {
        let _one = self.rotating.lock().await;
        let which = rng.usize(..AGENT_KEYS.len());
        let token = keys_command(
            &self.url,
            &["rotate", AGENT_KEYS[which], "--grace", ROTATION_GRACE],
        )
        .await?;
        for instance in instances {
            instance
                .wait_accepting(&token, Duration::from_secs(60))
                .await?;
        }
        self.agents.lock().expect("lock")[which] = token;
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(())
    }
}

/// Runs `oncely keys ARGS` on the database at `url`; its standard output
/// (a token), trimmed. Tried again for up to a minute while it fails (the
/// database may be failing over): a rotation that did commit and is run
/// again rotates twice, which the grace period covers.
async fn keys_command(url: &str, args: &[&str]) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match keys_command_once(url, args).await {
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            answer => return answer,
        }
    }
}

async fn keys_command_once(url: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(BINARY)
        .arg("keys")
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .map_err(|e| format!("run oncely keys: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "oncely keys {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `message` with `authorization: Bearer <token>`.
pub(crate) fn authorized<T>(mut message: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    if let Ok(value) = format!("Bearer {token}").parse() {
        message.metadata_mut().insert("authorization", value);
    }
    message
}

/// The instances of one run and their database.
pub(crate) struct Cluster {
    pub(crate) instances: Vec<Instance>,
    pub(crate) database: Database,
    pub(crate) keys: Keys,
    /// Held while PostgreSQL restarts.
    pub(crate) postgres: tokio::sync::Mutex<()>,
}

impl Cluster {
    /// Starts `count` instances on `database` and waits until all serve.
    pub(crate) async fn start(
        database: Database,
        count: usize,
        dir: &std::path::Path,
    ) -> Result<Self, String> {
        let keys = Keys::create(database.url_for(None)).await?;
        let mut instances = Vec::with_capacity(count);
        for index in 0..count {
            let proxy = match &database {
                Database::Postgres { upstream, .. } => {
                    Some(PgProxy::start_to(upstream.clone()).await?)
                }
                Database::Sqlite { .. } => None,
            };
            let port = fixed_port()?;
            let addr = format!("127.0.0.1:{port}");
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_millis(500))
                .connect_lazy();
            let env = vec![
                (
                    "DATABASE_URL",
                    database.url_for(proxy.as_ref().map(|p| p.port)),
                ),
                ("LISTEN_ADDR", addr.clone()),
                ("IDEMPOTENCY_RETENTION", RETENTION.into()),
                ("MISSING_KEY_POLICY", "fingerprint".into()),
                ("DEDUP_WINDOW", RETENTION.into()),
                ("DEFAULT_LEASE_DURATION", format!("{}s", LEASE.as_secs())),
                ("MAX_ATTEMPTS", "5".into()),
                ("RETRY_BACKOFF", "100ms".into()),
                ("RETRY_BACKOFF_MAX", "1s".into()),
                ("IN_FLIGHT_WAIT", "2s".into()),
                ("DB_ACQUIRE_TIMEOUT", "2s".into()),
                ("STATEMENT_TIMEOUT", "10s".into()),
                ("SHUTDOWN_GRACE", "2s".into()),
                ("RATE_LIMIT", "0".into()),
                ("AUTH", "required".into()),
                ("KEY_REFRESH_INTERVAL", "200ms".into()),
                // The start and the listener's reconnections too, which
                // the failover runs check.
                (
                    "RUST_LOG",
                    "warn,oncely::startup=info,oncely::storage::postgres::listener=info".into(),
                ),
            ];
            instances.push(Instance {
                index,
                env,
                log: dir.join(format!("instance-{index}.log")),
                child: tokio::sync::Mutex::new(None),
                busy: tokio::sync::Mutex::new(()),
                proxy,
                channel,
            });
        }
        // The first instance migrates the database alone, then the rest.
        for instance in &instances {
            instance.spawn().await?;
            instance.wait_serving(Duration::from_secs(60)).await?;
        }
        Ok(Self {
            instances,
            database,
            keys,
            postgres: tokio::sync::Mutex::new(()),
        })
    }

    /// Undoes whatever a fault left behind: every proxy open, every
    /// instance running and serving.
    pub(crate) async fn heal(&self) -> Result<(), String> {
        for instance in &self.instances {
            let _busy = instance.busy.lock().await;
            if let Some(proxy) = &instance.proxy {
                proxy.stall(false);
                proxy.restore();
            }
            instance.signal("CONT").await;
            if instance.is_down().await {
                instance.spawn().await?;
            }
            instance.wait_serving(Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    pub(crate) async fn stop(&self) {
        for instance in &self.instances {
            instance.stop().await;
        }
    }

    /// Each instance's LISTEN/NOTIFY listener, by its log: how often it
    /// lost the database and found it again, and the instances whose last
    /// process lost it and never listened again.
    pub(crate) fn listeners(&self) -> (usize, usize, Vec<String>) {
        const LOST: &str = "cannot listen for task notifications";
        const BACK: &str = "listening for task notifications again";
        const STARTED: &str = "serving tasks.v1";
        let (mut lost, mut back, mut deaf) = (0, 0, Vec::new());
        for instance in &self.instances {
            let log = std::fs::read_to_string(&instance.log).unwrap_or_default();
            // Listening, as far as the last process's log says.
            let mut listening = true;
            for line in log.lines() {
                if line.contains(STARTED) {
                    listening = true;
                } else if line.contains(LOST) {
                    lost += 1;
                    listening = false;
                } else if line.contains(BACK) {
                    back += 1;
                    listening = true;
                }
            }
            if !listening {
                deaf.push(format!(
                    "instance {} lost its listener and did not listen again (see {})",
                    instance.index,
                    instance.log.display()
                ));
            }
        }
        (lost, back, deaf)
    }
}
