//! A fresh database per test, on either store, and the few direct reads and
//! writes the tests make to check what the server stored. Each query is
//! written once for both stores (SQLite reads `$1` placeholders too); writes
//! that stand for a request go through the server's own statements.

use std::{str::FromStr, time::Duration};

use oncely::{
    domain::{Limits, NewTask},
    idempotency::{
        ClaimTarget, Creation, IdempotencyKey, KeyPolicy, KeySource, LegacyScope, MissingKeyPolicy,
    },
    proto::tasks_v1::{CreateTaskRequest, Task},
    storage::{KeyClaim, postgres, sqlite},
};
use sqlx::{
    Connection, PgConnection, PgPool, Postgres, SqliteConnection, SqlitePool, Transaction,
    postgres::PgConnectOptions,
    sqlite::{SqliteConnectOptions, SqlitePoolOptions},
};

/// The PostgreSQL server used when `DATABASE_URL` is unset.
const DEFAULT_BASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

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

/// Runs `$body` with `$pool` bound to this database's pool, whichever store
/// it is: the query in `$body` is written once.
macro_rules! on_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match &$db.pool {
            Pool::Postgres { pool: $pool, .. } => $body,
            Pool::Sqlite { pool: $pool, .. } => $body,
        }
    };
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
    /// Begins a transaction on a connection of its own that takes the
    /// write lock at once on SQLite.
    async fn begin(db: &TestDb) -> Self {
        match &db.pool {
            Pool::Postgres { pool, .. } => Self::Postgres(pool.begin().await.expect("begin")),
            Pool::Sqlite { options, .. } => {
                let mut conn = SqliteConnection::connect_with(options)
                    .await
                    .expect("connect");
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .expect("begin immediate");
                Self::Sqlite(conn)
            }
        }
    }

    /// Claims the key and inserts the task with the server's own statement,
    /// inside this transaction.
    async fn claim(&mut self, target: &ClaimTarget, task: &NewTask, creation: &Creation) {
        self.claim_as(target.claim(task, creation, &[])).await;
    }

    /// Claims `claim` (its key and its task) with the server's own
    /// statement, inside this transaction.
    async fn claim_as(&mut self, claim: KeyClaim) {
        match self {
            Self::Postgres(tx) => {
                let retention = claim.retention;
                postgres::queries::claim_keys(&mut **tx, std::slice::from_ref(&claim), retention)
                    .await
                    .expect("claim");
            }
            Self::Sqlite(conn) => {
                sqlite::queries::claim_key(conn, &claim.into())
                    .await
                    .expect("claim");
            }
        };
    }

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

/// What the server stored for one key, as text where the stores' types
/// differ.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct KeyRecord {
    pub(crate) task_id: String,
    pub(crate) fingerprint: Vec<u8>,
    pub(crate) response: Vec<u8>,
    pub(crate) created_at: String,
}

/// The key policy tests write records under: the test settings' retention.
fn policy() -> KeyPolicy {
    KeyPolicy {
        retention: Duration::from_secs(3600),
        missing_key: MissingKeyPolicy::Reject,
        dedup_window: Duration::from_secs(300),
        legacy: LegacyScope::Read,
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

    /// Applies the server's migrations older than `version` only: the
    /// schema of an earlier release, for upgrade tests (the server applies
    /// the rest when it starts).
    pub(crate) async fn migrate_before(&self, version: i64) {
        let mut migrator = match self.backend() {
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
        };
        let earlier: Vec<_> = migrator
            .migrations
            .iter()
            .filter(|m| m.version < version)
            .cloned()
            .collect();
        migrator.migrations = std::borrow::Cow::Owned(earlier);
        match &self.pool {
            Pool::Postgres { pool, .. } => migrator.run(pool).await,
            Pool::Sqlite { options, .. } => {
                let pool = SqlitePool::connect_with((**options).clone().create_if_missing(true))
                    .await
                    .expect("create the SQLite file");
                let ran = migrator.run(&pool).await;
                pool.close().await;
                ran
            }
        }
        .expect("the earlier migrations");
    }

    /// The store this database is.
    pub(crate) fn backend(&self) -> Backend {
        match self.pool {
            Pool::Postgres { .. } => Backend::Postgres,
            Pool::Sqlite { .. } => Backend::Sqlite,
        }
    }

    /// The pool, for tests that only make sense on PostgreSQL.
    pub(crate) fn pg_pool(&self) -> &PgPool {
        match &self.pool {
            Pool::Postgres { pool, .. } => pool,
            Pool::Sqlite { .. } => panic!("a PostgreSQL-only helper used on SQLite"),
        }
    }

    /// A transaction holding `tasks` locked against every other statement
    /// (PostgreSQL), until it is dropped or ends.
    pub(crate) async fn lock_tasks_table(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        self.lock_table("tasks").await
    }

    /// A transaction holding `table` locked against every other statement
    /// (PostgreSQL), until it is dropped or ends.
    pub(crate) async fn lock_table(
        &self,
        table: &str,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut lock = self.pg_pool().begin().await.expect("begin");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        )))
        .execute(&mut *lock)
        .await
        .expect("lock");
        lock
    }

    /// The host and port of the PostgreSQL server.
    pub(crate) fn server(&self) -> (String, u16) {
        let Pool::Postgres { base, .. } = &self.pool else {
            panic!("a PostgreSQL-only helper used on SQLite")
        };
        let options = PgConnectOptions::from_str(base).expect("valid DATABASE_URL");
        (options.get_host().to_owned(), options.get_port())
    }

    /// This database reached through the proxy listening on `proxy_port`.
    pub(crate) fn url_via(&self, proxy_port: u16) -> String {
        let Pool::Postgres { base, name, .. } = &self.pool else {
            panic!("a PostgreSQL-only helper used on SQLite")
        };
        url_for(base, name, Some(("127.0.0.1", proxy_port)))
    }

    /// How many sessions on this database wait for a lock (PostgreSQL):
    /// the server's calls blocked behind a transaction the test holds.
    pub(crate) async fn sessions_waiting_for_a_lock(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(self.pg_pool())
        .await
        .expect("read pg_stat_activity")
    }

    /// Waits until `sessions` sessions on this database wait for a lock
    /// (PostgreSQL): the evidence that the server's calls have reached the
    /// database and are blocked behind the test's transaction.
    #[track_caller]
    pub(crate) fn wait_for_sessions_waiting_for_a_lock(
        &self,
        sessions: i64,
    ) -> impl Future<Output = ()> + '_ {
        crate::support::eventually(
            Duration::from_secs(30),
            format!("{sessions} sessions to wait for a lock"),
            move || async move { (self.sessions_waiting_for_a_lock().await >= sessions).then_some(()) },
        )
    }

    /// Tasks and key records, counted in one statement (so in one
    /// snapshot, whatever commits meanwhile).
    pub(crate) async fn tasks_and_keys(&self) -> (i64, i64) {
        let sql = "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM idempotency_keys)";
        on_pool!(self, |pool| sqlx::query_as(sql).fetch_one(pool).await).expect("count rows")
    }

    pub(crate) async fn count(&self, table: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"));
        on_pool!(self, |pool| sqlx::query_scalar(sql).fetch_one(pool).await).expect("count rows")
    }

    /// Asserts that no task and no key record is stored.
    pub(crate) async fn assert_nothing_stored(&self) {
        assert_eq!(self.count("tasks").await, 0, "tasks stored");
        assert_eq!(
            self.count("idempotency_keys").await,
            0,
            "key records stored"
        );
    }

    /// Pretends every key record was created `age` earlier than it was.
    /// Deletes every key record behind the server's back.
    pub(crate) async fn delete_key_records(&self) {
        on_pool!(self, |pool| {
            sqlx::query("DELETE FROM idempotency_keys")
                .execute(pool)
                .await
                .expect("delete key records");
        });
    }

    pub(crate) async fn age_keys(&self, age: Duration) {
        // An interval on PostgreSQL, microseconds on SQLite.
        let sql = "UPDATE idempotency_keys SET created_at = created_at - $1";
        match &self.pool {
            Pool::Postgres { pool, .. } => sqlx::query(sql).bind(age).execute(pool).await.map(drop),
            Pool::Sqlite { pool, .. } => {
                let micros = sqlite::queries::micros(age);
                sqlx::query(sql).bind(micros).execute(pool).await.map(drop)
            }
        }
        .expect("age key records");
    }

    /// Replaces the stored response of the client's `key` (whatever the
    /// agent it is scoped by), as another build could have written it.
    pub(crate) async fn set_stored_response(&self, key: &str, response: &[u8]) {
        let sql = "UPDATE idempotency_keys SET response = $1 \
                   WHERE key = $2 OR key LIKE '@% ' || $2";
        let updated = on_pool!(self, |pool| {
            sqlx::query(sql)
                .bind(response)
                .bind(key)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .expect("update the stored response");
        assert_eq!(updated, 1, "one record holds the key");
    }

    /// Makes the database read-only or writable for new sessions, as a
    /// failover to a standby and back would, and ends the sessions open now
    /// so that the server's pool reconnects to it as it is.
    pub(crate) async fn set_read_only(&self, read_only: bool) {
        let Pool::Postgres { base, name, .. } = &self.pool else {
            panic!("a PostgreSQL-only helper used on SQLite")
        };
        let mut admin = PgConnection::connect(base).await.expect("connect");
        let value = if read_only { "on" } else { "off" };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {name} SET default_transaction_read_only = {value}"
        )))
        .execute(&mut admin)
        .await
        .expect("alter the database");
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .execute(&mut admin)
        .await
        .expect("end the database's sessions");
    }

    /// The stored record of the client's `key` (whatever the agent it is
    /// scoped by; test keys are UUIDs, which hold no LIKE wildcard).
    pub(crate) async fn key_record(&self, key: &str) -> Option<KeyRecord> {
        let sql = "SELECT CAST(task_id AS TEXT) AS task_id, fingerprint, response, \
                   CAST(created_at AS TEXT) AS created_at \
                   FROM idempotency_keys \
                   WHERE scope = $1 AND (key = $2 OR key LIKE '@% ' || $2)";
        on_pool!(self, |pool| {
            sqlx::query_as(sql)
                .bind(oncely::idempotency::CREATE_TASK_SCOPE)
                .bind(key)
                .fetch_optional(pool)
                .await
        })
        .expect("read the key record")
    }

    /// Makes the database refuse, with an error, every update of a task
    /// whose new row meets `condition` (SQL over `NEW`, written alike for
    /// both databases), as a failing constraint would.
    pub(crate) async fn refuse_task_updates_where(&self, condition: &str) {
        let statements = match self.backend() {
            Backend::Sqlite => vec![format!(
                "CREATE TRIGGER refuse_task_updates BEFORE UPDATE ON tasks WHEN {condition} \
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )],
            Backend::Postgres => vec![
                format!(
                    "CREATE FUNCTION refuse_task_updates() RETURNS trigger LANGUAGE plpgsql AS $$ \
                     BEGIN IF {condition} THEN RAISE EXCEPTION 'refused by the test'; END IF; \
                     RETURN NEW; END $$"
                ),
                "CREATE TRIGGER refuse_task_updates BEFORE UPDATE ON tasks \
                 FOR EACH ROW EXECUTE FUNCTION refuse_task_updates()"
                    .to_owned(),
            ],
        };
        for sql in statements {
            on_pool!(self, |pool| sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .execute(pool)
                .await
                .map(drop))
            .expect("create the trigger");
        }
    }

    /// Renames a table, to make the server's statements fail.
    pub(crate) async fn rename_table(&self, from: &str, to: &str) {
        let sql = sqlx::AssertSqlSafe(format!("ALTER TABLE {from} RENAME TO {to}"));
        on_pool!(self, |pool| sqlx::query(sql).execute(pool).await.map(drop))
            .expect("rename table");
    }

    /// How many tasks have `status`.
    pub(crate) async fn count_tasks_with_status(
        &self,
        status: oncely::proto::tasks_v1::TaskStatus,
    ) -> i64 {
        let sql = "SELECT count(*) FROM tasks WHERE status = $1";
        let status = status as i16;
        on_pool!(self, |pool| sqlx::query_scalar(sql)
            .bind(status)
            .fetch_one(pool)
            .await)
        .expect("count tasks")
    }

    /// Seconds from the task's last change until it may be leased again
    /// (its backoff, or what is left of its lease).
    pub(crate) async fn seconds_until_leasable(&self, task_id: &str) -> f64 {
        match &self.pool {
            Pool::Postgres { pool, .. } => sqlx::query_scalar(
                "SELECT extract(epoch FROM available_at - update_time)::float8 \
                 FROM tasks WHERE task_id = $1::uuid",
            )
            .bind(task_id)
            .fetch_one(pool)
            .await
            .expect("read the task"),
            Pool::Sqlite { pool, .. } => sqlx::query_scalar(
                "SELECT (available_at - update_time) / 1000000.0 FROM tasks WHERE task_id = $1",
            )
            .bind(task_id)
            .fetch_one(pool)
            .await
            .expect("read the task"),
        }
    }

    /// Makes the tasks numbered up to `seq` running on their `attempt`th
    /// lease, as if their workers had died: with [`Self::make_leasable_now`],
    /// leases that ran out.
    pub(crate) async fn set_running(&self, up_to_seq: i64, attempt: i32) {
        let sql = "UPDATE tasks SET status = 2, attempt = $1 WHERE seq <= $2";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(attempt)
            .bind(up_to_seq)
            .execute(pool)
            .await
            .map(drop))
        .expect("set tasks running");
    }

    /// Ends every backoff and lease: all queued and running tasks may be
    /// leased at once.
    pub(crate) async fn make_leasable_now(&self) {
        let sql = "UPDATE tasks SET available_at = create_time WHERE status IN (1, 2)";
        on_pool!(self, |pool| sqlx::query(sql).execute(pool).await.map(drop))
            .expect("end backoffs");
    }

    /// The client's key of every stored record: what follows the agent a
    /// record is scoped by (`"@<agent_id> <key>"`).
    pub(crate) async fn keys(&self) -> Vec<String> {
        let sql = "SELECT key FROM idempotency_keys ORDER BY key";
        let stored: Vec<String> =
            on_pool!(self, |pool| sqlx::query_scalar(sql).fetch_all(pool).await).expect("keys");
        stored
            .into_iter()
            .map(|key| match key.rsplit_once(' ') {
                Some((_, client)) => client.to_owned(),
                None => key,
            })
            .collect()
    }

    /// Every stored fingerprint.
    pub(crate) async fn fingerprints(&self) -> Vec<Vec<u8>> {
        let sql = "SELECT fingerprint FROM idempotency_keys";
        on_pool!(self, |pool| sqlx::query_scalar(sql).fetch_all(pool).await).expect("fingerprints")
    }

    /// Key records without their task, and tasks without a key record.
    pub(crate) async fn orphans(&self) -> (i64, i64) {
        let sql = "SELECT \
                     (SELECT count(*) FROM idempotency_keys k \
                      LEFT JOIN tasks t ON t.task_id = k.task_id WHERE t.task_id IS NULL), \
                     (SELECT count(*) FROM tasks t \
                      LEFT JOIN idempotency_keys k ON k.task_id = t.task_id WHERE k.task_id IS NULL)";
        on_pool!(self, |pool| sqlx::query_as(sql).fetch_one(pool).await).expect("orphans")
    }

    /// Creates `count` tasks for `agent_id` in one transaction, each under a
    /// key of its own, with the server's own statement: for paging tests.
    pub(crate) async fn insert_tasks(&self, agent_id: &str, count: usize) {
        self.insert_tasks_with(agent_id, serde_json::json!({}), count)
            .await;
    }

    /// [`insert_tasks`](Self::insert_tasks) with `parameters`. No instance
    /// is told of them: they are found by reading the database.
    pub(crate) async fn insert_tasks_with(
        &self,
        agent_id: &str,
        parameters: serde_json::Value,
        count: usize,
    ) {
        let mut tx = OpenTransaction::begin(self).await;
        let request = crate::support::request(agent_id, "step", parameters);
        let task = NewTask::parse(request, &Limits::default()).expect("valid");
        for _ in 0..count {
            let key = IdempotencyKey::try_from(crate::support::new_key().as_str()).expect("key");
            let target = ClaimTarget::new(KeySource::Header(&key), &task, &policy());
            let creation = Creation::new(&task, chrono::Utc::now());
            tx.claim(&target, &task, &creation).await;
        }
        tx.commit().await;
    }

    /// Opens a transaction that blocks every task insert until it ends: a
    /// stand-in for a slow database or another instance's long write.
    pub(crate) async fn hold_writes(&self) -> OpenTransaction {
        let mut tx = OpenTransaction::begin(self).await;
        if let OpenTransaction::Postgres(tx) = &mut tx {
            // On SQLite, BEGIN IMMEDIATE already holds the write lock.
            sqlx::query("LOCK TABLE tasks IN EXCLUSIVE MODE")
                .execute(&mut **tx)
                .await
                .expect("lock");
        }
        tx
    }

    /// Claims `key` for `request` as a server of the earlier version did,
    /// scoped by the API key `owner` that sent it (`"<owner> <key>"`; the
    /// bare key for an unauthenticated call), with the server's own
    /// statement, in a transaction left open (commit it for a record
    /// written before an upgrade). Returns the transaction and the response
    /// the claim stored.
    pub(crate) async fn begin_in_flight_legacy(
        &self,
        owner: Option<&str>,
        key: &str,
        request: &CreateTaskRequest,
    ) -> (OpenTransaction, Task) {
        let task = NewTask::parse(request.clone(), &Limits::default()).expect("valid");
        let parsed = IdempotencyKey::try_from(key).expect("valid key");
        let target = ClaimTarget::new(KeySource::Header(&parsed), &task, &policy());
        let creation = Creation::new(&task, chrono::Utc::now());
        let mut claim = target.claim(&task, &creation, &[]);
        claim.key = match owner {
            Some(owner) => format!("{owner} {key}"),
            None => key.to_owned(),
        };
        let mut tx = OpenTransaction::begin(self).await;
        tx.claim_as(claim).await;
        (tx, creation.response().clone())
    }

    /// Claims `key` for `request` exactly as the server does, with the
    /// server's own code and statement, in a transaction left open: what
    /// another instance's in-flight request looks like to the server under
    /// test. Returns the transaction and the response the claim stored.
    pub(crate) async fn begin_in_flight(
        &self,
        key: &str,
        request: &CreateTaskRequest,
    ) -> (OpenTransaction, Task) {
        let task = NewTask::parse(request.clone(), &Limits::default()).expect("valid");
        let key = IdempotencyKey::try_from(key).expect("valid key");
        let target = ClaimTarget::new(KeySource::Header(&key), &task, &policy());
        let creation = Creation::new(&task, chrono::Utc::now());
        let mut tx = OpenTransaction::begin(self).await;
        tx.claim(&target, &task, &creation).await;
        (tx, creation.response().clone())
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
