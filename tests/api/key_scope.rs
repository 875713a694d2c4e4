//! Idempotency keys belong to the agent a task is for, not to the API key
//! that sent it: every key allowed to act for an agent shares its records
//! (two replicas of an agent, a key rotated between a first attempt and
//! its retry), and two agents never see each other's. `oncely keys rotate`
//! gives a key a new token with a grace period for the old one. Records
//! of the earlier, per-API-key scope keep answering after an upgrade.

use std::time::Duration;

use oncely::proto::tasks_v1::{CreateTaskRequest, Task};
use serde_json::json;
use tonic::{Code, Response, Status};

use crate::{
    auth::{create_key, keys_command, with_token},
    support::{
        Backend, BinaryApp, TestApp, TestDb, assert_status, email_request, eventually, keyed,
        new_key, replayed, request, test_settings,
    },
};

/// The migration that scoped records by agent: upgrade tests write records
/// on the schema before it.
const AGENT_SCOPE_MIGRATION: i64 = 20261206000002;

/// A server on `db` that reloads its keys every 200 ms.
async fn spawn(db: &TestDb) -> TestApp {
    let mut settings = test_settings(&db.url);
    settings.key_refresh_interval = Duration::from_millis(200);
    TestApp::spawn_with(settings).await
}

/// CreateTask `request` with `key`, as the caller `token`.
async fn create_as(
    app: &TestApp,
    token: &str,
    key: &str,
    request: CreateTaskRequest,
) -> Result<Response<Task>, Status> {
    app.tasks
        .clone()
        .create_task(with_token(token, keyed(Some(key), request)))
        .await
}

/// Runs `oncely keys rotate NAME ARGS`; returns the new token.
fn rotate(db: &TestDb, name: &str, args: &[&str]) -> String {
    let mut all = vec!["rotate", name];
    all.extend(args);
    let output = keys_command(db, &all);
    assert!(output.status.success(), "keys rotate failed: {output:?}");
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// `oncely keys list`'s lines for the key `name`.
fn listed(db: &TestDb, name: &str) -> Vec<String> {
    let output = keys_command(db, &["list"]);
    assert!(output.status.success(), "keys list failed: {output:?}");
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .filter(|line| line.starts_with(&format!("{name}\t")))
        .map(str::to_owned)
        .collect()
}

/// Two keys of one agent (two replicas, or a key and its successor): the
/// same idempotency key through each is one task, the second answer a
/// replay; a different request under it is refused, whichever key sends it.
async fn two_keys_of_one_agent_share_its_idempotency_keys(backend: Backend) {
    let db = TestDb::new(backend).await;
    let a = create_key(&db, "agent7-a", "agent", &[("--agent-id", "agent-7")]);
    let b = create_key(&db, "agent7-b", "agent", &[("--agent-id", "agent-7")]);
    let app = spawn(&db).await;
    let key = new_key();
    let send = || request("agent-7", "send_email", json!({"to": "ada@example.com"}));

    let first = create_as(&app, &a, &key, send()).await.expect("first");
    let retry = create_as(&app, &b, &key, send()).await.expect("retry");
    let other = create_as(&app, &b, &key, request("agent-7", "send_sms", json!({}))).await;

    assert_eq!(replayed(&first), Some("false"));
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.get_ref(), first.get_ref(), "the first answer");
    assert_status(
        other,
        Code::FailedPrecondition,
        Some("IDEMPOTENCY_KEY_REUSED"),
    );
    assert_eq!(db.count("tasks").await, 1);
}

/// A key rotated between a first attempt and its retry: the retry, with
/// the new token, replays the first answer.
async fn a_retry_after_a_key_rotation_replays(backend: Backend) {
    let db = TestDb::new(backend).await;
    let old = create_key(&db, "agent7", "agent", &[("--agent-id", "agent-7")]);
    let app = spawn(&db).await;
    let key = new_key();
    let first = create_as(&app, &old, &key, email_request())
        .await
        .expect("first");

    let new = rotate(&db, "agent7", &["--grace", "1h"]);
    let retry = eventually(Duration::from_secs(30), "the new token to work", || async {
        create_as(&app, &new, &key, email_request()).await.ok()
    })
    .await;

    assert_ne!(new, old);
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.get_ref(), first.get_ref(), "the first answer");
    assert_eq!(db.count("tasks").await, 1);
}

/// After `keys rotate`, the old token keeps working for the grace period
/// (and `keys list` shows both), then every call with it is refused; with
/// `--grace 0` it is refused at once.
async fn a_rotated_out_token_works_for_its_grace_period_then_is_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let old = create_key(&db, "agent7", "agent", &[("--agent-id", "agent-7")]);
    let app = spawn(&db).await;

    let new = rotate(&db, "agent7", &["--grace", "8s"]);
    let while_both = listed(&db, "agent7");
    eventually(Duration::from_secs(30), "the new token to work", || async {
        create_as(&app, &new, &new_key(), email_request())
            .await
            .ok()
    })
    .await;
    let old_in_grace = create_as(&app, &old, &new_key(), email_request()).await;
    let refused = eventually(
        Duration::from_secs(60),
        "the old token to be refused after its grace period",
        || async {
            create_as(&app, &old, &new_key(), email_request())
                .await
                .err()
        },
    )
    .await;
    let after_grace = listed(&db, "agent7");

    let newest = rotate(&db, "agent7", &["--grace", "0"]);
    let new_refused = eventually(
        Duration::from_secs(30),
        "the rotated-out token to be refused at once",
        || async {
            create_as(&app, &new, &new_key(), email_request())
                .await
                .err()
        },
    )
    .await;

    assert_eq!(while_both.len(), 2, "{while_both:?}");
    assert!(
        while_both[1].contains("previous token, until"),
        "{while_both:?}"
    );
    old_in_grace.expect("the old token works in its grace period");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(after_grace.len(), 1, "{after_grace:?}");
    assert_eq!(new_refused.code(), Code::Unauthenticated, "{new_refused:?}");
    create_as(&app, &newest, &new_key(), email_request())
        .await
        .expect("the newest token works");
}

/// Another agent's key with the same idempotency key: its own task, never
/// the other agent's answer; and it cannot create for the other agent. An
/// admin key creating for an agent uses that agent's records.
async fn another_agents_key_never_reaches_its_records(backend: Backend) {
    let db = TestDb::new(backend).await;
    let seven = create_key(&db, "agent7", "agent", &[("--agent-id", "agent-7")]);
    let eight = create_key(&db, "agent8", "agent", &[("--agent-id", "agent-8")]);
    let admin = create_key(&db, "ops", "admin", &[]);
    let app = spawn(&db).await;
    let key = new_key();
    let for_agent = |agent: &str| request(agent, "send_email", json!({"to": "ada@example.com"}));

    let seventh = create_as(&app, &seven, &key, for_agent("agent-7"))
        .await
        .expect("agent-7");
    let eighth = create_as(&app, &eight, &key, for_agent("agent-8"))
        .await
        .expect("agent-8");
    let trespass = create_as(&app, &eight, &key, for_agent("agent-7")).await;
    let by_admin = create_as(&app, &admin, &key, for_agent("agent-7"))
        .await
        .expect("admin");

    assert_eq!(replayed(&eighth), Some("false"), "a task of its own");
    assert_ne!(eighth.get_ref().task_id, seventh.get_ref().task_id);
    assert_eq!(eighth.get_ref().agent_id, "agent-8");
    assert_status(trespass, Code::PermissionDenied, None);
    assert_eq!(replayed(&by_admin), Some("true"));
    assert_eq!(by_admin.get_ref(), seventh.get_ref());
    assert_eq!(db.count("tasks").await, 2);
}

/// Keyless requests under the fingerprint policy: one agent's identical
/// requests through two of its keys are one task.
async fn keyless_requests_of_one_agent_dedup_across_its_keys(backend: Backend) {
    let db = TestDb::new(backend).await;
    let a = create_key(&db, "agent7-a", "agent", &[("--agent-id", "agent-7")]);
    let b = create_key(&db, "agent7-b", "agent", &[("--agent-id", "agent-7")]);
    let mut settings = test_settings(&db.url);
    settings.missing_key_policy = oncely::idempotency::MissingKeyPolicy::Fingerprint;
    let app = TestApp::spawn_with(settings).await;
    let keyless = |token: &str| {
        let call = with_token(token, keyed(None, email_request()));
        let mut tasks = app.tasks.clone();
        async move { tasks.create_task(call).await }
    };

    let first = keyless(&a).await.expect("first key");
    let second = keyless(&b).await.expect("second key");

    assert_eq!(replayed(&second), Some("true"));
    assert_eq!(second.get_ref(), first.get_ref());
    assert_eq!(db.count("tasks").await, 1);
}

/// Records written before the upgrade, scoped by the API key that wrote
/// them, answer their retries after it: through that key, and through
/// another key of the same agent; never another agent's request.
async fn records_written_before_the_upgrade_answer_their_retries(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.migrate_before(AGENT_SCOPE_MIGRATION).await;
    let key = new_key();
    let other_key = new_key();
    let (tx, first) = db
        .begin_in_flight_legacy(Some("agent7-a"), &key, &email_request())
        .await;
    tx.commit().await;
    let (tx, sms) = db
        .begin_in_flight_legacy(
            Some("agent7-a"),
            &other_key,
            &request("agent-7", "send_sms", json!({})),
        )
        .await;
    tx.commit().await;
    // The upgrade: `keys create` and the server migrate the rest.
    let a = create_key(&db, "agent7-a", "agent", &[("--agent-id", "agent-7")]);
    let b = create_key(&db, "agent7-b", "agent", &[("--agent-id", "agent-7")]);
    let eight = create_key(&db, "agent8", "agent", &[("--agent-id", "agent-8")]);
    let app = spawn(&db).await;

    let same_key = create_as(&app, &a, &key, email_request()).await;
    let sibling = create_as(
        &app,
        &b,
        &other_key,
        request("agent-7", "send_sms", json!({})),
    )
    .await;
    let reused = create_as(&app, &b, &key, request("agent-7", "send_sms", json!({}))).await;
    let stranger = create_as(
        &app,
        &eight,
        &key,
        request("agent-8", "send_email", json!({})),
    )
    .await;

    let same_key = same_key.expect("the retry through the same key");
    assert_eq!(replayed(&same_key), Some("true"));
    assert_eq!(same_key.into_inner(), first);
    let sibling = sibling.expect("the retry through another key of the agent");
    assert_eq!(replayed(&sibling), Some("true"));
    assert_eq!(sibling.into_inner(), sms);
    assert_status(
        reused,
        Code::FailedPrecondition,
        Some("IDEMPOTENCY_KEY_REUSED"),
    );
    let stranger = stranger.expect("another agent's request");
    assert_eq!(replayed(&stranger), Some("false"));
    assert_eq!(db.count("tasks").await, 3);
}

/// Records written before the upgrade by a server without keys (the bare
/// key) answer their retries after it.
async fn unauthenticated_records_written_before_the_upgrade_answer_their_retries(backend: Backend) {
    let db = TestDb::new(backend).await;
    db.migrate_before(AGENT_SCOPE_MIGRATION).await;
    let key = new_key();
    let (tx, first) = db
        .begin_in_flight_legacy(None, &key, &email_request())
        .await;
    tx.commit().await;
    let app = spawn(&db).await;

    let retry = app.create(Some(&key), email_request()).await;
    let fresh = app.create(Some(&new_key()), email_request()).await;

    let retry = retry.expect("the retry");
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.into_inner(), first);
    assert_eq!(replayed(&fresh.expect("a new key")), Some("false"));
    assert_eq!(db.count("tasks").await, 2);
}

/// LEGACY_KEY_SCOPE=dual, for a rolling upgrade: each record is written
/// in the agent's scope and under every key of the agent (and the calling
/// key), so that an instance of the earlier version, which looks a key up
/// as `"<key name> <key>"`, finds it whichever key the retry comes with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dual_scope_writes_each_record_where_the_earlier_version_looks() {
    let db = TestDb::new(Backend::Postgres).await;
    let token = create_key(&db, "agent7-a", "agent", &[("--agent-id", "agent-7")]);
    create_key(&db, "agent7-b", "agent", &[("--agent-id", "agent-7")]);
    create_key(&db, "agent8", "agent", &[("--agent-id", "agent-8")]);
    let app = BinaryApp::start(&db, &[("LEGACY_KEY_SCOPE", "dual")]).await;
    let key = new_key();

    let created = create_as(&app, &token, &key, email_request())
        .await
        .expect("create")
        .into_inner();

    let records: Vec<(String, String)> =
        sqlx::query_as("SELECT key, task_id::text FROM idempotency_keys ORDER BY key")
            .fetch_all(db.pg_pool())
            .await
            .expect("the key records");
    let task = created.task_id;
    assert_eq!(
        records,
        [
            (format!("@agent-7 {key}"), task.clone()),
            (format!("agent7-a {key}"), task.clone()),
            (format!("agent7-b {key}"), task),
        ]
    );
    assert_eq!(db.count("tasks").await, 1);
}

/// LEGACY_KEY_SCOPE=dual: a key acting for two agents sends one
/// idempotency key for each; the second agent's request is its own task,
/// although the earlier scope's record under that key name is the first
/// agent's (it is left to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dual_scope_keeps_two_agents_apart_under_one_key_name() {
    let db = TestDb::new(Backend::Postgres).await;
    let token = create_key(
        &db,
        "platform",
        "agent",
        &[("--agent-id", "agent-7"), ("--agent-id", "agent-8")],
    );
    let app = BinaryApp::start(&db, &[("LEGACY_KEY_SCOPE", "dual")]).await;
    let key = new_key();
    let for_agent = |agent: &str| request(agent, "send_email", json!({}));

    let seventh = create_as(&app, &token, &key, for_agent("agent-7"))
        .await
        .expect("agent-7");
    let eighth = create_as(&app, &token, &key, for_agent("agent-8"))
        .await
        .expect("agent-8");
    let eighth_again = create_as(&app, &token, &key, for_agent("agent-8"))
        .await
        .expect("agent-8's retry");

    assert_eq!(replayed(&eighth), Some("false"), "a task of its own");
    assert_ne!(eighth.get_ref().task_id, seventh.get_ref().task_id);
    assert_eq!(replayed(&eighth_again), Some("true"));
    assert_eq!(eighth_again.get_ref(), eighth.get_ref());
    assert_eq!(db.count("tasks").await, 2);
}

/// LEGACY_KEY_SCOPE=dual: a request still in flight on an instance of the
/// earlier version (a transaction holding its record, in the earlier
/// scope) is waited for, and its retry on the upgraded instance replays
/// it: one task, whichever version took the request first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_in_flight_on_the_earlier_version_is_waited_for_and_replayed() {
    let db = TestDb::new(Backend::Postgres).await;
    let token = create_key(&db, "agent7-a", "agent", &[("--agent-id", "agent-7")]);
    let app = BinaryApp::start(
        &db,
        &[("LEGACY_KEY_SCOPE", "dual"), ("IN_FLIGHT_WAIT", "60s")],
    )
    .await;
    let key = new_key();
    let (tx, first) = db
        .begin_in_flight_legacy(Some("agent7-a"), &key, &email_request())
        .await;

    let retry = tokio::spawn({
        let app = TestApp::connect_to(app.server.addr());
        let (token, key) = (token.clone(), key.clone());
        async move { create_as(&app, &token, &key, email_request()).await }
    });
    db.wait_for_sessions_waiting_for_a_lock(1).await;
    tx.commit().await;

    let retry = retry.await.expect("join").expect("the retry");
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.into_inner(), first);
    assert_eq!(db.tasks_and_keys().await, (1, 1), "the retry left nothing");
}

conformance!(
    two_keys_of_one_agent_share_its_idempotency_keys,
    a_retry_after_a_key_rotation_replays,
    a_rotated_out_token_works_for_its_grace_period_then_is_refused,
    another_agents_key_never_reaches_its_records,
    keyless_requests_of_one_agent_dedup_across_its_keys,
    records_written_before_the_upgrade_answer_their_retries,
    unauthenticated_records_written_before_the_upgrade_answer_their_retries,
);
