//! A fresh database per test, on either backend, and the few direct reads
//! and writes the tests make to check what the server stored.

use std::{str::FromStr, time::Duration};

use oncely::{
    domain::{Limits, NewTask},
    idempotency::{CREATE_TASK_SCOPE, Fingerprint},
    proto::tasks_v1::{CreateTaskRequest, Task, TaskStatus},
};
use prost::Message;
use sqlx::{
    Connection, PgConnection, PgPool, Postgres, SqliteConnection, SqlitePool, Transaction,
    postgres::PgConnectOptions,
    sqlite::{SqliteConnectOptions, SqlitePoolOptions},
};

/// The PostgreSQL server used when `DATABASE_URL` is unset.
const DEFAULT_BASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// SQLite's current time in microseconds, as the server computes it.
const SQLITE_NOW: &str = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";

/// The stores a test can run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Sqlite,
}

fn base_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_BASE_URL.to_owned())
}

/// `url` pointing at database `name` (and at `host:port` when given).
fn url_for(url: &str, name: &str, host_port: Option<(&str, u16)>) -> String {
    let (scheme, rest) = url.split_once("://").expect("DATABASE_URL has a scheme");
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let query = tail.find('?').map(|i| &tail[i..]).unwrap_or("");
    let authority = match host_port {
        None => authority.to_owned(),
        Some((host, port)) => match authority.rsplit_once('@') {
            Some((userinfo, _)) => format!("{userinfo}@{host}:{port}"),
            None => format!("{host}:{port}"),
        },
    };
    format!("{scheme}://{authority}/{name}{query}")
}

enum Pool {
    Postgres {
        pool: PgPool,
        name: String,
        base: String,
    },
    Sqlite {
        pool: SqlitePool,
        options: Box<SqliteConnectOptions>,
        _dir: tempfile::TempDir,
    },
}

/// A database of its own for one test, removed when the test ends.
pub(crate) struct TestDb {
    pub(crate) url: String,
    pool: Pool,
}

/// A transaction a test holds open on its own connection.
pub(crate) enum OpenTransaction {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(SqliteConnection),
}

impl OpenTransaction {
    pub(crate) async fn commit(self) {
        match self {
            Self::Postgres(tx) => tx.commit().await.expect("commit"),
            Self::Sqlite(mut conn) => {
                sqlx::query("COMMIT")
                    .execute(&mut conn)
                    .await
                    .expect("commit");
            }
        }
    }

    pub(crate) async fn rollback(self) {
        match self {
            Self::Postgres(tx) => tx.rollback().await.expect("rollback"),
            Self::Sqlite(mut conn) => {
                sqlx::query("ROLLBACK")
                    .execute(&mut conn)
                    .await
                    .expect("rollback");
            }
        }
    }
}

impl TestDb {
    pub(crate) async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Postgres => Self::postgres().await,
            Backend::Sqlite => Self::sqlite(),
        }
    }

    async fn postgres() -> Self {
        let base = base_url();
        let mut admin = PgConnection::connect(&base).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL at {base} ({e}). The PostgreSQL tests need a real \
                 server: start the local one with `pg_ctlcluster --skip-systemctl-redirect 15 \
                 main start`, or set DATABASE_URL to a server where this role may create \
                 databases."
            )
        });
        let name = format!("oncely_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let url = url_for(&base, &name, None);
        let pool = PgPool::connect(&url)
            .await
            .expect("connect to the test database");
        Self {
            url,
            pool: Pool::Postgres { pool, name, base },
        }
    }

    fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("oncely.db").display());
        // The server creates the file and its tables; the test's connections
        // wait out the server's writer rather than fail.
        let options = SqliteConnectOptions::from_str(&url)
            .expect("sqlite url")
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_lazy_with(options.clone());
        Self {
            url,
            pool: Pool::Sqlite {
                pool,
                options: Box::new(options),
                _dir: dir,
            },
        }
    }

    /// A PostgreSQL database that does not exist yet; the caller's server is
    /// expected to create it.
    pub(crate) async fn uncreated_postgres() -> Self {
        let db = Self::postgres().await;
        let Pool::Postgres { pool, name, base } = &db.pool else {
            unreachable!()
        };
        pool.close().await;
        let mut admin = PgConnection::connect(base).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("drop the test database");
        db
    }

    /// The pool, for tests that only make sense on PostgreSQL.
    pub(crate) fn pg_pool(&self) -> &PgPool {
        match &self.pool {
            Pool::Postgres { pool, .. } => pool,
            Pool::Sqlite { .. } => panic!("a PostgreSQL-only helper used on SQLite"),
        }
    }

    /// The host and port of the PostgreSQL server.
    pub(crate) fn server(&self) -> (String, u16) {
        let Pool::Postgres { base, .. } = &self.pool else {
            panic!("a PostgreSQL-only helper used on SQLite")
        };
        let options = PgConnectOptions::from_str(base).expect("valid DATABASE_URL");
        (options.get_host().to_owned(), options.get_port())
    }

    /// This database reached through `proxy`.
    pub(crate) fn url_via(&self, proxy: &crate::helpers::PgProxy) -> String {
        let Pool::Postgres { base, name, .. } = &self.pool else {
            panic!("a PostgreSQL-only helper used on SQLite")
        };
        url_for(base, name, Some(("127.0.0.1", proxy.port)))
    }

    pub(crate) async fn count(&self, table: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"));
        match &self.pool {
            Pool::Postgres { pool, .. } => sqlx::query_scalar(sql).fetch_one(pool).await,
            Pool::Sqlite { pool, .. } => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .expect("count rows")
    }

    /// Pretends every key record was created `age` earlier than it was.
    pub(crate) async fn age_keys(&self, age: Duration) {
        match &self.pool {
            Pool::Postgres { pool, .. } => {
                sqlx::query("UPDATE idempotency_keys SET created_at = created_at - $1::interval")
                    .bind(age)
                    .execute(pool)
                    .await
                    .expect("age key records");
            }
            Pool::Sqlite { pool, .. } => {
                sqlx::query("UPDATE idempotency_keys SET created_at = created_at - ?1")
                    .bind(age.as_micros() as i64)
                    .execute(pool)
                    .await
                    .expect("age key records");
            }
        }
    }

    /// The stored record of `key`: task id, fingerprint, response, and
    /// creation time in microseconds.
    pub(crate) async fn key_record(&self, key: &str) -> Option<(String, Vec<u8>, Vec<u8>, i64)> {
        match &self.pool {
            Pool::Postgres { pool, .. } => {
                sqlx::query_as(
                    "SELECT task_id::text, fingerprint, response, \
                 (extract(epoch FROM created_at) * 1000000)::bigint \
                 FROM idempotency_keys WHERE scope = $1 AND key = $2",
                )
                .bind(CREATE_TASK_SCOPE)
                .bind(key)
                .fetch_optional(pool)
                .await
            }
            Pool::Sqlite { pool, .. } => {
                sqlx::query_as(
                    "SELECT task_id, fingerprint, response, created_at \
                 FROM idempotency_keys WHERE scope = ?1 AND key = ?2",
                )
                .bind(CREATE_TASK_SCOPE)
                .bind(key)
                .fetch_optional(pool)
                .await
            }
        }
        .expect("read the key record")
    }

    /// Renames a table, to make the server's statements fail.
    pub(crate) async fn rename_table(&self, from: &str, to: &str) {
        let sql = sqlx::AssertSqlSafe(format!("ALTER TABLE {from} RENAME TO {to}"));
        match &self.pool {
            Pool::Postgres { pool, .. } => sqlx::query(sql).execute(pool).await.map(drop),
            Pool::Sqlite { pool, .. } => sqlx::query(sql).execute(pool).await.map(drop),
        }
        .expect("rename table");
    }

    /// Every stored key.
    pub(crate) async fn keys(&self) -> Vec<String> {
        let sql = "SELECT key FROM idempotency_keys ORDER BY key";
        match &self.pool {
            Pool::Postgres { pool, .. } => sqlx::query_scalar(sql).fetch_all(pool).await,
            Pool::Sqlite { pool, .. } => sqlx::query_scalar(sql).fetch_all(pool).await,
        }
        .expect("keys")
    }

    /// Every stored fingerprint.
    pub(crate) async fn fingerprints(&self) -> Vec<Vec<u8>> {
        let sql = "SELECT fingerprint FROM idempotency_keys";
        match &self.pool {
            Pool::Postgres { pool, .. } => sqlx::query_scalar(sql).fetch_all(pool).await,
            Pool::Sqlite { pool, .. } => sqlx::query_scalar(sql).fetch_all(pool).await,
        }
        .expect("fingerprints")
    }

    /// Key records without their task, and tasks without a key record.
    pub(crate) async fn orphans(&self) -> (i64, i64) {
        let keys = "SELECT count(*) FROM idempotency_keys k \
                    LEFT JOIN tasks t ON t.task_id = k.task_id WHERE t.task_id IS NULL";
        let tasks = "SELECT count(*) FROM tasks t \
                     LEFT JOIN idempotency_keys k ON k.task_id = t.task_id WHERE k.task_id IS NULL";
        let (a, b) = match &self.pool {
            Pool::Postgres { pool, .. } => (
                sqlx::query_scalar(keys).fetch_one(pool).await,
                sqlx::query_scalar(tasks).fetch_one(pool).await,
            ),
            Pool::Sqlite { pool, .. } => (
                sqlx::query_scalar(keys).fetch_one(pool).await,
                sqlx::query_scalar(tasks).fetch_one(pool).await,
            ),
        };
        (a.expect("orphan keys"), b.expect("orphan tasks"))
    }

    /// Inserts `count` tasks for `agent_id` directly, for paging tests.
    pub(crate) async fn insert_tasks(&self, agent_id: &str, count: usize) {
        match &self.pool {
            Pool::Postgres { pool, .. } => {
                sqlx::query(
                    "INSERT INTO tasks (task_id, agent_id, action, parameters, status, create_time) \
                     SELECT gen_random_uuid(), $1, 'step', '{}'::jsonb, 1, now() \
                     FROM generate_series(1, $2)",
                )
                .bind(agent_id)
                .bind(count as i64)
                .execute(pool)
                .await
                .expect("insert tasks");
            }
            Pool::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await.expect("begin");
                for _ in 0..count {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "INSERT INTO tasks (task_id, agent_id, action, parameters, status, create_time) \
                         VALUES (?1, ?2, 'step', '{{}}', 1, {SQLITE_NOW})"
                    )))
                    .bind(uuid::Uuid::new_v4().to_string())
                    .bind(agent_id)
                    .execute(&mut *tx)
                    .await
                    .expect("insert task");
                }
                tx.commit().await.expect("commit");
            }
        }
    }

    /// Opens a transaction that blocks every task insert until it ends: a
    /// stand-in for a slow database or another instance's long write.
    pub(crate) async fn hold_writes(&self) -> OpenTransaction {
        match &self.pool {
            Pool::Postgres { pool, .. } => {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("LOCK TABLE tasks IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await
                    .expect("lock");
                OpenTransaction::Postgres(tx)
            }
            Pool::Sqlite { options, .. } => {
                let mut conn = SqliteConnection::connect_with(options)
                    .await
                    .expect("connect");
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .expect("begin immediate");
                OpenTransaction::Sqlite(conn)
            }
        }
    }

    /// Writes `request`'s key record and task exactly as the server would,
    /// in a transaction left open: what another instance's in-flight request
    /// looks like to the server under test.
    pub(crate) async fn begin_in_flight(
        &self,
        key: &str,
        request: &CreateTaskRequest,
    ) -> (OpenTransaction, Task) {
        let new_task = NewTask::parse(request.clone(), &Limits::default()).expect("valid");
        let task_id = uuid::Uuid::new_v4();
        let task = Task {
            task_id: task_id.to_string(),
            agent_id: new_task.agent_id.clone(),
            action: new_task.action.clone(),
            parameters: request.parameters.clone(),
            status: TaskStatus::Queued as i32,
            create_time: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
            result: None,
        };
        let fingerprint = Fingerprint::of_new_task(CREATE_TASK_SCOPE, &new_task);
        let response = task.encode_to_vec();
        let open = match &self.pool {
            Pool::Postgres { pool, .. } => {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query(
                    "INSERT INTO tasks (task_id, agent_id, action, parameters, status, create_time) \
                     VALUES ($1, $2, $3, $4::jsonb, 1, now())",
                )
                .bind(task_id)
                .bind(&new_task.agent_id)
                .bind(&new_task.action)
                .bind(&new_task.parameters_json)
                .execute(&mut *tx)
                .await
                .expect("insert task");
                sqlx::query(
                    "INSERT INTO idempotency_keys (scope, key, fingerprint, task_id, response) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(CREATE_TASK_SCOPE)
                .bind(key)
                .bind(fingerprint.as_bytes())
                .bind(task_id)
                .bind(&response)
                .execute(&mut *tx)
                .await
                .expect("insert key");
                OpenTransaction::Postgres(tx)
            }
            Pool::Sqlite { options, .. } => {
                let mut conn = SqliteConnection::connect_with(options)
                    .await
                    .expect("connect");
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .expect("begin");
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO tasks (task_id, agent_id, action, parameters, status, create_time) \
                     VALUES (?1, ?2, ?3, ?4, 1, {SQLITE_NOW})"
                )))
                .bind(task_id.to_string())
                .bind(&new_task.agent_id)
                .bind(&new_task.action)
                .bind(&new_task.parameters_json)
                .execute(&mut conn)
                .await
                .expect("insert task");
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO idempotency_keys (scope, key, fingerprint, task_id, response, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, {SQLITE_NOW})"
                )))
                .bind(CREATE_TASK_SCOPE)
                .bind(key)
                .bind(fingerprint.as_bytes())
                .bind(task_id.to_string())
                .bind(&response)
                .execute(&mut conn)
                .await
                .expect("insert key");
                OpenTransaction::Sqlite(conn)
            }
        };
        (open, task)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // SQLite's file goes with its temporary directory.
        let Pool::Postgres { base, name, .. } = &self.pool else {
            return;
        };
        let (base, name) = (base.clone(), name.clone());
        // Drop runs inside the test's runtime; use a runtime of our own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&base).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
            });
        })
        .join();
    }
}
