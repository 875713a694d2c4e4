//! Agents that cannot send keys: deduplication by fingerprint within a
//! window (MISSING_KEY_POLICY=fingerprint).

use std::time::Duration;

use oncely::{Settings, idempotency::MissingKeyPolicy, proto::tasks_v1::CreateTaskRequest};
use prost::Message;
use tonic::{Code, Status};

use crate::support::{
    Backend, CREATE_TASK_PATH, TestApp, TestDb, assert_invalid, assert_status, create_all_at_once,
    email_request, new_key, replayed, request, test_settings, uncached,
};

const WINDOW: Duration = Duration::from_secs(300);

fn fingerprint_settings(db: &TestDb) -> Settings {
    let mut settings = test_settings(&db.url);
    settings.missing_key_policy = MissingKeyPolicy::Fingerprint;
    settings.dedup_window = WINDOW;
    settings
}

fn source<T>(response: &tonic::Response<T>) -> Option<&str> {
    response
        .metadata()
        .get("idempotency-key-source")
        .and_then(|v| v.to_str().ok())
}

fn status_source(status: &Status) -> Option<&str> {
    status
        .metadata()
        .get("idempotency-key-source")
        .and_then(|v| v.to_str().ok())
}

async fn a_keyless_repeat_within_the_window_replays_the_first_response_byte_for_byte(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_with(fingerprint_settings(&db)).await;
    let body = email_request().encode_to_vec();

    let first = app
        .raw_call(CREATE_TASK_PATH, None, body.clone())
        .await
        .expect("first");
    let repeat = app
        .raw_call(CREATE_TASK_PATH, None, body)
        .await
        .expect("repeat");

    assert_eq!(replayed(&first), Some("false"));
    assert_eq!(source(&first), Some("fingerprint"));
    assert_eq!(replayed(&repeat), Some("true"));
    assert_eq!(source(&repeat), Some("fingerprint"));
    assert_eq!(repeat.get_ref(), first.get_ref());
    assert_eq!(db.count("tasks").await, 1);
}

async fn a_keyless_repeat_after_the_window_executes_afresh(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_with(uncached(fingerprint_settings(&db))).await;
    let first = app
        .create(None, email_request())
        .await
        .expect("first")
        .into_inner();
    db.age_keys(WINDOW + Duration::from_secs(1)).await;

    let later = app.create(None, email_request()).await.expect("later");
    let repeat = app.create(None, email_request()).await.expect("repeat");

    assert_eq!(replayed(&later), Some("false"));
    let later = later.into_inner();
    assert_ne!(later.task_id, first.task_id);
    assert_eq!(replayed(&repeat), Some("true"));
    assert_eq!(repeat.into_inner(), later);
    assert_eq!(db.count("tasks").await, 2);
}

async fn keyless_requests_that_differ_in_any_field_are_different_tasks(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_with(fingerprint_settings(&db)).await;
    let variants = [
        email_request(),
        CreateTaskRequest {
            agent_id: "agent-8".into(),
            ..email_request()
        },
        CreateTaskRequest {
            action: "send_sms".into(),
            ..email_request()
        },
        request(
            "agent-7",
            "send_email",
            serde_json::json!({"to": "bob@example.com"}),
        ),
    ];

    for variant in variants {
        let response = app.create(None, variant).await.expect("create");
        assert_eq!(replayed(&response), Some("false"));
    }

    assert_eq!(db.count("tasks").await, 4);
}

async fn keyed_and_keyless_records_never_answer_for_each_other(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_with(fingerprint_settings(&db)).await;
    let key = new_key();

    let keyless = app.create(None, email_request()).await.expect("keyless");
    let with_key = app
        .create(Some(&key), email_request())
        .await
        .expect("keyed");
    let keyless_again = app
        .create(None, email_request())
        .await
        .expect("keyless again");
    let with_key_again = app
        .create(Some(&key), email_request())
        .await
        .expect("keyed again");

    assert_eq!(replayed(&with_key), Some("false"));
    assert_eq!(source(&with_key), Some("header"));
    assert_eq!(source(&with_key_again), Some("header"));
    assert_eq!(replayed(&keyless_again), Some("true"));
    let (keyless, with_key) = (keyless.into_inner(), with_key.into_inner());
    assert_ne!(keyless.task_id, with_key.task_id);
    assert_eq!(keyless_again.into_inner(), keyless);
    assert_eq!(with_key_again.into_inner(), with_key);
    assert_eq!(db.count("tasks").await, 2);
}

async fn the_keyed_contract_is_unchanged_under_the_fingerprint_policy(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_with(fingerprint_settings(&db)).await;
    let key = new_key();
    app.create_with_key(&key).await;

    let reused = assert_status(
        app.create(
            Some(&key),
            request("agent-7", "send_sms", serde_json::json!({})),
        )
        .await,
        Code::FailedPrecondition,
        Some("IDEMPOTENCY_KEY_REUSED"),
    );
    let malformed = assert_invalid(
        app.create(Some("has space"), email_request()).await,
        "IDEMPOTENCY_KEY_INVALID",
    );

    assert_eq!(status_source(&reused), Some("header"));
    assert_eq!(status_source(&malformed), Some("header"));
    assert_eq!(db.count("tasks").await, 1);
}

async fn an_invalid_keyless_request_is_refused_and_says_its_source(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_with(fingerprint_settings(&db)).await;

    let status = assert_invalid(
        app.create(
            None,
            CreateTaskRequest {
                agent_id: String::new(),
                ..email_request()
            },
        )
        .await,
        "INVALID_REQUEST",
    );

    assert_eq!(status_source(&status), Some("fingerprint"));
    assert_eq!(db.count("idempotency_keys").await, 0);
}

async fn identical_keyless_requests_released_together_create_one_task(backend: Backend) {
    const CALLS: usize = 32;
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_with(fingerprint_settings(&db)).await;

    let mut ids = Vec::new();
    for result in create_all_at_once(&[&app], CALLS, |_| None).await {
        ids.push(result.expect("create").into_inner().task_id);
    }

    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "different tasks: {ids:?}"
    );
    assert_eq!(db.count("tasks").await, 1);
    assert_eq!(db.count("idempotency_keys").await, 1);
}

async fn cleanup_removes_keyless_records_past_the_window_and_keeps_live_keyed_ones(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_with(uncached(fingerprint_settings(&db))).await;
    let key = new_key();
    app.create(None, email_request()).await.expect("keyless");
    app.create(Some(&key), email_request())
        .await
        .expect("keyed");
    // Past the 5m window, well inside the 1h retention.
    db.age_keys(Duration::from_secs(600)).await;

    let deleted = app.cleanup(None).await.expect("cleanup");

    assert_eq!(deleted, 1);
    assert_eq!(db.keys().await, [key]);
    assert_eq!(db.count("tasks").await, 2);
}

async fn cleanup_never_deletes_keyless_records_inside_the_window(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = fingerprint_settings(&db);
    // A window longer than the 1h retention: cleanup must still honour it.
    settings.dedup_window = Duration::from_secs(7200);
    let app = TestApp::spawn_with(uncached(settings)).await;
    let first = app.create(None, email_request()).await.expect("keyless");
    db.age_keys(Duration::from_secs(5400)).await;

    let deleted = app.cleanup(None).await.expect("cleanup");
    let repeat = app.create(None, email_request()).await.expect("repeat");

    assert_eq!(deleted, 0);
    assert_eq!(replayed(&repeat), Some("true"));
    assert_eq!(repeat.into_inner(), first.into_inner());
}

async fn without_the_policy_a_keyless_request_is_still_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    assert_invalid(
        app.create(None, email_request()).await,
        "IDEMPOTENCY_KEY_MISSING",
    );
    let keyed = app
        .create(Some(&new_key()), email_request())
        .await
        .expect("keyed");

    assert_eq!(source(&keyed), Some("header"));
    assert_eq!(db.count("tasks").await, 1);
}

/// `email_request()` without a key, asking for the fingerprint rule with
/// `idempotency-fallback: value`.
fn asking(value: &'static str) -> tonic::Request<CreateTaskRequest> {
    let mut call = tonic::Request::new(email_request());
    call.metadata_mut().insert(
        "idempotency-fallback",
        tonic::metadata::MetadataValue::from_static(value),
    );
    call
}

async fn a_caller_may_ask_for_the_fingerprint_rule_under_the_reject_policy(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The default policy: keyless calls are refused unless they ask.
    let app = TestApp::spawn(&db).await;
    let mut tasks = app.tasks.clone();

    let first = tasks
        .create_task(asking("fingerprint"))
        .await
        .expect("first");
    let repeat = tasks
        .create_task(asking("fingerprint"))
        .await
        .expect("repeat");
    assert_eq!(
        (replayed(&first), source(&first)),
        (Some("false"), Some("fingerprint"))
    );
    assert_eq!(
        (replayed(&repeat), source(&repeat)),
        (Some("true"), Some("fingerprint"))
    );
    assert_eq!(repeat.into_inner(), first.into_inner());

    // A key wins over the fallback; another value is refused.
    let mut keyed_call = asking("fingerprint");
    keyed_call
        .metadata_mut()
        .insert("idempotency-key", new_key().parse().expect("metadata"));
    let keyed = tasks.create_task(keyed_call).await.expect("keyed");
    assert_eq!(source(&keyed), Some("header"));
    let refused = tasks.create_task(asking("content")).await;
    let status = assert_invalid(refused, "IDEMPOTENCY_KEY_INVALID");
    assert!(
        status.message().contains("idempotency-fallback"),
        "{status:?}"
    );
    let refused = tasks.create_task(email_request()).await;
    assert_invalid(refused, "IDEMPOTENCY_KEY_MISSING");
    assert_eq!(db.count("tasks").await, 2);
}

conformance!(
    a_caller_may_ask_for_the_fingerprint_rule_under_the_reject_policy,
    a_keyless_repeat_within_the_window_replays_the_first_response_byte_for_byte,
    a_keyless_repeat_after_the_window_executes_afresh,
    keyless_requests_that_differ_in_any_field_are_different_tasks,
    keyed_and_keyless_records_never_answer_for_each_other,
    the_keyed_contract_is_unchanged_under_the_fingerprint_policy,
    an_invalid_keyless_request_is_refused_and_says_its_source,
    identical_keyless_requests_released_together_create_one_task,
    cleanup_removes_keyless_records_past_the_window_and_keeps_live_keyed_ones,
    without_the_policy_a_keyless_request_is_still_refused,
    cleanup_never_deletes_keyless_records_inside_the_window,
);
