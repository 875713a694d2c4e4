//! Group commit and the replay cache: claims that arrive together are
//! committed together, and each still gets exactly its own outcome; live
//! records are answered from memory, and never past their retention.

use std::time::Duration;

use oncely::idempotency::MissingKeyPolicy;
use oncely::proto::tasks_v1::Task;
use serde_json::json;
use tonic::{Code, Response};

use crate::support::{
    Backend, BinaryApp, TestApp, TestDb, assert_status, keyed, new_key, replayed, request,
    test_settings,
};

/// Calls released together, so that they share batches.
const CALLS: usize = 24;

/// The retention or window of the tests that see records expire: long
/// enough that a replay sent right after the first call surely comes
/// within it, however slow the machine.
const SHORT_LIFE: Duration = Duration::from_secs(5);

/// Sleeps until `life` has passed since `answered`, when the answer that
/// wrote a record arrived: the record, written before, has then expired,
/// and so has any copy the cache keeps. The cache's clock is the server's
/// own monotonic one, which no test can move, so this wait is real; it is
/// measured from the answer, so it is long enough however late that came.
async fn sleep_past(answered: tokio::time::Instant, life: Duration) {
    tokio::time::sleep_until(answered + life + Duration::from_millis(250)).await;
}

async fn one_key_with_two_bodies_at_once_gives_one_task_and_refuses_the_other_body(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CALLS));
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let mut client = app.tasks.clone();
            let barrier = barrier.clone();
            let call = keyed(
                Some(&key),
                request("agent-1", "send_email", json!({"body": i % 2})),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                (i % 2, client.create_task(call).await)
            })
        })
        .collect();

    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("join"));
    }

    let created: Vec<_> = answers
        .iter()
        .filter_map(|(body, answer)| match answer {
            Ok(response) if replayed(response) == Some("false") => Some(*body),
            _ => None,
        })
        .collect();
    assert_eq!(created.len(), 1, "one creation: {answers:?}");
    let winner = created[0];
    let task_id = answers
        .iter()
        .find_map(|(_, a)| a.as_ref().ok().map(|r| r.get_ref().task_id.clone()))
        .expect("a task");
    for (body, answer) in answers {
        if body == winner {
            let response = answer.expect("the winner's body is replayed");
            assert_eq!(response.get_ref().task_id, task_id);
        } else {
            assert_status(
                answer,
                Code::FailedPrecondition,
                Some("IDEMPOTENCY_KEY_REUSED"),
            );
        }
    }
    assert_eq!(db.count("tasks").await, 1);
    assert_eq!(db.count("idempotency_keys").await, 1);
}

async fn many_keys_at_once_each_get_their_own_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let keys: Vec<String> = (0..CALLS).map(|_| new_key()).collect();
    // Each key twice, so batches hold duplicates beside distinct keys.
    let answers =
        crate::support::create_all_at_once(&[&app], 2 * CALLS, |i| Some(keys[i % CALLS].clone()))
            .await;

    let mut ids = std::collections::HashMap::new();
    for (i, answer) in answers.into_iter().enumerate() {
        let task_id = answer.expect("every call succeeds").into_inner().task_id;
        let first = ids.entry(i % CALLS).or_insert_with(|| task_id.clone());
        assert_eq!(*first, task_id, "one task per key");
    }
    let distinct: std::collections::HashSet<_> = ids.values().collect();
    assert_eq!(distinct.len(), CALLS);
    assert_eq!(db.count("tasks").await, CALLS as i64);
}

/// A claim stuck behind another transaction's lock makes its batch fail;
/// the others in it are claimed again one by one and succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_held_elsewhere_does_not_fail_the_others_in_its_batch() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut settings = test_settings(&db.url);
    settings.database.in_flight_wait = Duration::from_millis(500);
    let app = TestApp::spawn_with(settings).await;
    let held = new_key();
    let (tx, _) = db
        .begin_in_flight(&held, &crate::support::email_request())
        .await;

    let answers = crate::support::create_all_at_once(&[&app], CALLS, |i| {
        Some(if i == 0 { held.clone() } else { new_key() })
    })
    .await;

    assert_held_then_created(answers);
    tx.rollback().await;
    assert_eq!(db.count("tasks").await, (CALLS - 1) as i64);
}

/// The first answer is the held key's IN_PROGRESS; every other one is a
/// creation, not a replay.
fn assert_held_then_created(
    answers: Vec<Result<tonic::Response<oncely::proto::tasks_v1::Task>, tonic::Status>>,
) {
    let mut answers = answers.into_iter();
    assert_status(
        answers.next().expect("the held key's answer"),
        Code::Aborted,
        Some("IDEMPOTENCY_REQUEST_IN_PROGRESS"),
    );
    for answer in answers {
        let response = answer.expect("the others are created");
        assert_eq!(replayed(&response), Some("false"), "created, not replayed");
    }
}

/// Keyed and keyless claims in one batch go in statements of their own: one
/// failing (a key held elsewhere past the bound) leaves the other's
/// creations as they were, each answered as created, not as its own replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_keyed_claim_leaves_the_keyless_ones_of_its_batch_created() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut settings = test_settings(&db.url);
    settings.database.in_flight_wait = Duration::from_millis(500);
    settings.missing_key_policy = MissingKeyPolicy::Fingerprint;
    let app = TestApp::spawn_with(settings).await;
    let held = new_key();
    let (tx, _) = db
        .begin_in_flight(&held, &crate::support::email_request())
        .await;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CALLS));
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let mut client = app.tasks.clone();
            let barrier = barrier.clone();
            let call = if i == 0 {
                keyed(Some(&held), crate::support::email_request())
            } else {
                keyed(None, request("agent-1", "send_email", json!({"n": i})))
            };
            tokio::spawn(async move {
                barrier.wait().await;
                client.create_task(call).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("join"));
    }
    tx.rollback().await;

    assert_held_then_created(answers);
    assert_eq!(db.count("tasks").await, (CALLS - 1) as i64);
}

async fn a_replay_is_answered_from_memory_without_the_database(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let first = app
        .create(Some(&key), crate::support::email_request())
        .await
        .expect("create");

    db.delete_key_records().await;
    let replay = app
        .create(Some(&key), crate::support::email_request())
        .await
        .expect("replay");

    assert_eq!(replayed(&replay), Some("true"));
    assert_eq!(replay.get_ref(), first.get_ref());
    assert_eq!(db.count("tasks").await, 1, "the database was not asked");
}

/// The e-mail request sent with `key` (or none) twice, then once more when
/// `life` has passed since the second answer: the three answers.
async fn before_and_after(app: &TestApp, key: Option<&str>, life: Duration) -> [Response<Task>; 3] {
    let first = app
        .create(key, crate::support::email_request())
        .await
        .expect("create");
    let repeat = app
        .create(key, crate::support::email_request())
        .await
        .expect("repeat");
    let answered = tokio::time::Instant::now();
    sleep_past(answered, life).await;
    let again = app
        .create(key, crate::support::email_request())
        .await
        .expect("create again");
    [first, repeat, again]
}

async fn a_key_reused_after_its_retention_executes_afresh(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.retention = SHORT_LIFE;
    let app = TestApp::spawn_with(settings).await;
    let [first, replay, again] = before_and_after(&app, Some(&new_key()), SHORT_LIFE).await;

    assert_eq!(replayed(&replay), Some("true"), "cached while live");

    assert_eq!(replayed(&again), Some("false"));
    assert_ne!(again.get_ref().task_id, first.get_ref().task_id);
    assert_eq!(db.count("tasks").await, 2);
}

async fn a_keyless_request_after_its_window_executes_afresh(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.missing_key_policy = MissingKeyPolicy::Fingerprint;
    settings.dedup_window = SHORT_LIFE;
    let app = TestApp::spawn_with(settings).await;
    let [first, repeat, again] = before_and_after(&app, None, SHORT_LIFE).await;

    assert_eq!(replayed(&repeat), Some("true"));

    assert_eq!(replayed(&again), Some("false"));
    assert_ne!(again.get_ref().task_id, first.get_ref().task_id);
}

async fn after_cleanup_a_cached_key_executes_afresh(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    // Nothing has to happen within it: the shortest retention will do.
    let retention = Duration::from_secs(1);
    settings.retention = retention;
    let app = TestApp::spawn_with(settings).await;
    let key = new_key();
    let first = app
        .create(Some(&key), crate::support::email_request())
        .await
        .expect("create");
    let answered = tokio::time::Instant::now();

    sleep_past(answered, retention).await;
    let deleted = app.cleanup(None).await.expect("cleanup");
    let again = app
        .create(Some(&key), crate::support::email_request())
        .await
        .expect("create again");

    assert_eq!(deleted, 1);
    assert_eq!(replayed(&again), Some("false"));
    assert_ne!(again.get_ref().task_id, first.get_ref().task_id);
    assert_eq!(db.count("idempotency_keys").await, 1);
}

/// A claim that waits while another request replaces an expired record
/// must answer from the new record, never from the expired one it read
/// before the wait.
async fn a_claim_that_waited_on_a_replaced_record_answers_from_the_new_one(backend: Backend) {
    let db = TestDb::new(backend).await;
    // Without the cache (see `uncached`), waiting far longer than the test
    // takes to commit the replacement.
    let app = BinaryApp::start(
        &db,
        &[("REPLAY_CACHE_BYTES", "0"), ("IN_FLIGHT_WAIT", "60s")],
    )
    .await;
    let key = new_key();
    let expired = app
        .create(Some(&key), crate::support::email_request())
        .await
        .expect("create")
        .into_inner();
    db.age_keys(Duration::from_secs(2 * 3600)).await;
    let (tx, replacement) = db
        .begin_in_flight(&key, &crate::support::email_request())
        .await;

    let waiting = app.spawn_create(&key, crate::support::email_request());
    app.blocked(&db, "CreateTask", 1).await;
    tx.commit().await;
    let answer = waiting.await.expect("join").expect("an answer");

    assert_eq!(replayed(&answer), Some("true"));
    assert_eq!(answer.get_ref().task_id, replacement.task_id);
    assert_ne!(answer.get_ref().task_id, expired.task_id);
}

conformance!(
    a_claim_that_waited_on_a_replaced_record_answers_from_the_new_one,
    one_key_with_two_bodies_at_once_gives_one_task_and_refuses_the_other_body,
    many_keys_at_once_each_get_their_own_task,
    a_replay_is_answered_from_memory_without_the_database,
    a_key_reused_after_its_retention_executes_afresh,
    a_keyless_request_after_its_window_executes_afresh,
    after_cleanup_a_cached_key_executes_afresh,
);
