//! The embedded SQLite store: one file, WAL mode, one writer.
//!
//! SQLite lets one transaction write at a time. Rather than let pooled
//! connections race for the write lock (and surface "database is locked"),
//! every write goes to a single writer task that owns one connection and runs
//! each unit of work to completion, in order. Reads use a pool and, in WAL
//! mode, never wait for the writer. Because the writer task, not the request,
//! runs each transaction, a cancelled request cannot leave one half done.
//!
//! SQLite is for one process: several instances on one file would contend
//! for its lock. Use PostgreSQL for more than one instance.

use std::{
    path::Path,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{
    Connection, Row, SqliteConnection, SqlitePool,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
    },
};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{
    ClaimOutcome, DatabaseSettings, KeyLookup, NewKeyedTask, StorageError, Store, StoredKey,
    TaskRow,
};

/// How many writes may queue for the writer before callers wait to enqueue.
const WRITE_QUEUE: usize = 1024;

/// The SQLite-backed store: a pool of readers and the writer task's queue.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    readers: SqlitePool,
    /// A reader of its own for health checks, so busy readers do not look
    /// like a dead database.
    health: SqlitePool,
    writer: mpsc::Sender<Command>,
    /// False while the writer has no working connection.
    writer_ok: Arc<AtomicBool>,
    /// How long a write may wait for the writer, queue included.
    in_flight_wait: Duration,
    description: String,
}

type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

/// A unit of work for the writer.
#[derive(Debug)]
enum Command {
    Claim(Box<Claim>, Reply<ClaimOutcome>),
    DeleteBatch {
        cutoff: i64,
        batch_size: i64,
        scope: String,
        reply: Reply<u64>,
    },
    /// Checks (and if need be reopens) the writer's connection.
    Ping(Reply<()>),
}

/// An owned [`NewKeyedTask`], to cross into the writer task.
#[derive(Debug)]
struct Claim {
    scope: String,
    key: String,
    fingerprint: Vec<u8>,
    task_id: String,
    response: Vec<u8>,
    agent_id: String,
    action: String,
    parameters_json: String,
    status: i16,
    create_time: i64,
    retention: i64,
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Opens (creating it if asked) the database file, applies the
    /// migrations and starts the writer.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StorageError> {
        let options = SqliteConnectOptions::from_str(&settings.url)
            .map_err(StorageError::Internal)?
            .create_if_missing(settings.create_database)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit the client was told about survives power loss,
            // or a retry after it would run the side effect again.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(settings.in_flight_wait);
        let path = options.get_filename().to_owned();
        if path.as_os_str().is_empty() || path == Path::new(":memory:") {
            return Err(StorageError::Config(format!(
                "{} is an in-memory SQLite database, which would lose every key on restart; \
                 use a file such as sqlite://oncely.db",
                settings.url
            )));
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent.filter(|_| settings.create_database) {
            tokio::fs::create_dir_all(parent).await.map_err(|e| {
                StorageError::Config(format!("cannot create {}: {e}", parent.display()))
            })?;
        }

        let migration_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&migration_pool)
            .await
            .map_err(|e| StorageError::Internal(e.into()))?;
        migration_pool.close().await;

        let connection = SqliteConnection::connect_with(&options).await?;
        let (writer, commands) = mpsc::channel(WRITE_QUEUE);
        let writer_ok = Arc::new(AtomicBool::new(true));
        tokio::spawn(run_writer(
            options.clone(),
            connection,
            commands,
            writer_ok.clone(),
        ));
        let readers = SqlitePoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options.clone());
        let health = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options);
        let shown = std::path::absolute(&path).unwrap_or(path);
        Ok(Self {
            readers,
            health,
            writer,
            writer_ok,
            in_flight_wait: settings.in_flight_wait,
            description: format!("sqlite at {}", shown.display()),
        })
    }

    /// Hands a command to the writer and waits for its answer, at most the
    /// in-flight bound (queue included).
    async fn write<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StorageError> {
        let (reply, answer) = oneshot::channel();
        let round_trip = async {
            self.writer
                .send(command(reply))
                .await
                .map_err(|_| StorageError::Unavailable(sqlx::Error::WorkerCrashed))?;
            answer
                .await
                .map_err(|_| StorageError::Unavailable(sqlx::Error::WorkerCrashed))?
        };
        tokio::time::timeout(self.in_flight_wait, round_trip)
            .await
            .map_err(|_| StorageError::WriterBusy(self.in_flight_wait))?
    }
}

/// Runs writes one at a time until every sender is gone. After a failed
/// write it makes sure no transaction is left open; a connection that no
/// longer works is dropped and reopened for the next command.
async fn run_writer(
    options: SqliteConnectOptions,
    connection: SqliteConnection,
    mut commands: mpsc::Receiver<Command>,
    writer_ok: Arc<AtomicBool>,
) {
    let mut connection = Some(connection);
    while let Some(command) = commands.recv().await {
        if command.abandoned() {
            continue;
        }
        let conn = match connection.as_mut() {
            Some(conn) => conn,
            None => match SqliteConnection::connect_with(&options).await {
                Ok(conn) => connection.insert(conn),
                Err(error) => {
                    tracing::warn!(%error, "cannot reopen the SQLite writer connection");
                    writer_ok.store(false, Ordering::SeqCst);
                    command.fail(error.into());
                    continue;
                }
            },
        };
        let ok = command.run(conn).await;
        let healthy = ok || recover(conn).await;
        if !healthy {
            tracing::warn!("the SQLite writer connection is broken; reopening it");
            if let Some(conn) = connection.take() {
                let _ = conn.close().await;
            }
        }
        writer_ok.store(healthy, Ordering::SeqCst);
    }
    if let Some(conn) = connection {
        let _ = conn.close().await;
    }
}

/// After a failed write: leaves no transaction open and checks that the
/// connection still answers. SQLite may already have rolled back by itself
/// (after I/O errors or a full disk), in which case ROLLBACK fails with
/// SQLITE_ERROR, "no transaction is active", which is fine.
async fn recover(connection: &mut SqliteConnection) -> bool {
    match sqlx::query("ROLLBACK").execute(&mut *connection).await {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("1") => {}
        Err(_) => return false,
    }
    sqlx::query("SELECT 1")
        .execute(&mut *connection)
        .await
        .is_ok()
}

impl Command {
    /// Whether the caller has given up waiting: its work need not be done,
    /// since nothing was written and a retry executes afresh.
    fn abandoned(&self) -> bool {
        match self {
            Command::Claim(_, reply) => reply.is_closed(),
            Command::DeleteBatch { reply, .. } => reply.is_closed(),
            Command::Ping(reply) => reply.is_closed(),
        }
    }

    fn fail(self, error: StorageError) {
        match self {
            Command::Claim(_, reply) => drop(reply.send(Err(error))),
            Command::DeleteBatch { reply, .. } => drop(reply.send(Err(error))),
            Command::Ping(reply) => drop(reply.send(Err(error))),
        }
    }

    /// Runs the command and answers it; returns whether it succeeded.
    async fn run(self, connection: &mut SqliteConnection) -> bool {
        match self {
            Command::Claim(claim, reply) => {
                let result = claim_in_transaction(connection, &claim).await;
                let ok = result.is_ok();
                let _ = reply.send(result);
                ok
            }
            Command::DeleteBatch {
                cutoff,
                batch_size,
                scope,
                reply,
            } => {
                let result = sqlx::query(
                    "DELETE FROM idempotency_keys WHERE rowid IN ( \
                         SELECT rowid FROM idempotency_keys \
                         WHERE scope = ?3 AND created_at < ?1 \
                         ORDER BY created_at LIMIT ?2)",
                )
                .bind(cutoff)
                .bind(batch_size)
                .bind(scope)
                .execute(&mut *connection)
                .await
                .map(|done| done.rows_affected())
                .map_err(StorageError::from);
                let ok = result.is_ok();
                let _ = reply.send(result);
                ok
            }
            Command::Ping(reply) => {
                let result = sqlx::query("SELECT 1")
                    .execute(&mut *connection)
                    .await
                    .map(drop)
                    .map_err(StorageError::from);
                let ok = result.is_ok();
                let _ = reply.send(result);
                ok
            }
        }
    }
}

/// Claims the key and inserts its task in one IMMEDIATE transaction. On any
/// failure the statement's error is returned; the writer loop then makes
/// sure the transaction is gone.
async fn claim_in_transaction(
    connection: &mut SqliteConnection,
    claim: &Claim,
) -> Result<ClaimOutcome, StorageError> {
    // IMMEDIATE takes the write lock now, waiting out another process's
    // writer for at most the busy timeout.
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *connection)
        .await?;
    let outcome = claim_statements(connection, claim).await?;
    let end = match outcome {
        ClaimOutcome::Claimed => "COMMIT",
        ClaimOutcome::AlreadyClaimed => "ROLLBACK",
    };
    sqlx::query(end).execute(&mut *connection).await?;
    Ok(outcome)
}

async fn claim_statements(
    connection: &mut SqliteConnection,
    claim: &Claim,
) -> Result<ClaimOutcome, StorageError> {
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys AS k (scope, key, fingerprint, task_id, response, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, CAST(unixepoch('subsec') * 1000000 AS INTEGER)) \
         ON CONFLICT (scope, key) DO UPDATE \
             SET fingerprint = excluded.fingerprint, task_id = excluded.task_id, \
                 response = excluded.response, created_at = excluded.created_at \
             WHERE k.created_at <= excluded.created_at - ?6 \
         RETURNING task_id",
    )
    .bind(&claim.scope)
    .bind(&claim.key)
    .bind(&claim.fingerprint)
    .bind(&claim.task_id)
    .bind(&claim.response)
    .bind(claim.retention)
    .fetch_optional(&mut *connection)
    .await?;
    if claimed.is_none() {
        return Ok(ClaimOutcome::AlreadyClaimed);
    }
    sqlx::query(
        "INSERT INTO tasks (task_id, agent_id, action, parameters, status, create_time) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .bind(&claim.task_id)
    .bind(&claim.agent_id)
    .bind(&claim.action)
    .bind(&claim.parameters_json)
    .bind(claim.status)
    .bind(claim.create_time)
    .execute(&mut *connection)
    .await?;
    Ok(ClaimOutcome::Claimed)
}

impl Store for SqliteStore {
    fn describe(&self) -> String {
        self.description.clone()
    }

    #[tracing::instrument(skip_all)]
    async fn find_key(
        &self,
        scope: &str,
        key: &str,
        retention: Duration,
    ) -> Result<KeyLookup, StorageError> {
        let row = sqlx::query(
            "SELECT CAST(unixepoch('subsec') * 1000000 AS INTEGER) AS now, k.fingerprint, k.response \
             FROM (SELECT 1) AS one \
             LEFT JOIN idempotency_keys AS k \
               ON k.scope = ?1 AND k.key = ?2 \
              AND k.created_at > CAST(unixepoch('subsec') * 1000000 AS INTEGER) - ?3",
        )
        .bind(scope)
        .bind(key)
        .bind(micros(retention))
        .fetch_one(&self.readers)
        .await?;
        let fingerprint: Option<Vec<u8>> = row.try_get("fingerprint")?;
        let response: Option<Vec<u8>> = row.try_get("response")?;
        Ok(KeyLookup {
            record: fingerprint
                .zip(response)
                .map(|(fingerprint, response)| StoredKey {
                    fingerprint,
                    response,
                }),
            now: time(row.try_get("now")?)?,
        })
    }

    #[tracing::instrument(skip_all, fields(task_id = %new.task_id))]
    async fn claim_key_and_insert_task(
        &self,
        new: &NewKeyedTask<'_>,
    ) -> Result<ClaimOutcome, StorageError> {
        let claim = Box::new(Claim {
            scope: new.scope.to_owned(),
            key: new.key.to_owned(),
            fingerprint: new.fingerprint.as_bytes().to_vec(),
            task_id: new.task_id.to_string(),
            response: new.response.to_vec(),
            agent_id: new.task.agent_id.clone(),
            action: new.task.action.clone(),
            parameters_json: new.task.parameters_json.clone(),
            status: new.status,
            create_time: new.create_time.timestamp_micros(),
            retention: micros(new.retention),
        });
        self.write(|reply| Command::Claim(claim, reply)).await
    }

    #[tracing::instrument(skip_all)]
    async fn get_task(&self, task_id: Uuid) -> Result<Option<TaskRow>, StorageError> {
        sqlx::query(
            "SELECT seq, task_id, agent_id, action, parameters, status, result, create_time \
             FROM tasks WHERE task_id = ?1",
        )
        .bind(task_id.to_string())
        .fetch_optional(&self.readers)
        .await?
        .map(|row| task_row(&row))
        .transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn list_tasks(
        &self,
        agent_id: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<TaskRow>, StorageError> {
        sqlx::query(
            "SELECT seq, task_id, agent_id, action, parameters, status, result, create_time \
             FROM tasks WHERE agent_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .bind(agent_id)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(task_row)
        .collect()
    }

    async fn cleanup_cutoff(&self, older_than: Duration) -> Result<DateTime<Utc>, StorageError> {
        let cutoff: i64 =
            sqlx::query_scalar("SELECT CAST(unixepoch('subsec') * 1000000 AS INTEGER) - ?1")
                .bind(micros(older_than))
                .fetch_one(&self.readers)
                .await?;
        time(cutoff)
    }

    /// A write of its own, so claims interleave with cleanup.
    #[tracing::instrument(skip_all)]
    async fn delete_keys_created_before(
        &self,
        scope: &str,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StorageError> {
        let scope = scope.to_owned();
        self.write(|reply| Command::DeleteBatch {
            cutoff: cutoff.timestamp_micros(),
            batch_size: limit,
            scope,
            reply,
        })
        .await
    }

    async fn ping(&self) -> Result<(), StorageError> {
        if self.writer.is_closed() {
            return Err(StorageError::Unavailable(sqlx::Error::WorkerCrashed));
        }
        if !self.writer_ok.load(Ordering::SeqCst) {
            // Only when the writer is known broken: ask it to reopen its
            // connection, so health recovers without waiting for traffic.
            self.write(Command::Ping).await?;
        }
        sqlx::query("SELECT 1 FROM idempotency_keys LIMIT 1")
            .execute(&self.health)
            .await?;
        Ok(())
    }
}

fn time(micros: i64) -> Result<DateTime<Utc>, StorageError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StorageError::Corrupt(format!("timestamp {micros} is out of range")))
}

fn task_row(row: &SqliteRow) -> Result<TaskRow, StorageError> {
    let task_id: String = row.try_get("task_id")?;
    let parameters: String = row.try_get("parameters")?;
    let result: Option<String> = row.try_get("result")?;
    let json = |text: &str| {
        serde_json::from_str(text)
            .map_err(|e| StorageError::Corrupt(format!("task {task_id} holds invalid JSON: {e}")))
    };
    Ok(TaskRow {
        seq: row.try_get("seq")?,
        task_id: Uuid::parse_str(&task_id)
            .map_err(|e| StorageError::Corrupt(format!("task id {task_id:?}: {e}")))?,
        agent_id: row.try_get("agent_id")?,
        action: row.try_get("action")?,
        parameters: json(&parameters)?,
        status: row.try_get("status")?,
        result: result.as_deref().map(json).transpose()?,
        create_time: time(row.try_get("create_time")?)?,
    })
}
