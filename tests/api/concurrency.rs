//! Real concurrency: many calls released together at a barrier.

use crate::support::Backend;

use crate::support::{
    TestApp, TestDb, create_all_at_once, email_request, new_key, replayed, test_settings,
};

const CALLS: usize = 64;

/// Fires `CALLS` CreateTask calls with `key` spread over `apps`, all released
/// at once, and returns the task ids of the successes and the replay count.
async fn race(apps: &[&TestApp], key: &str) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut replays = 0;
    for result in create_all_at_once(apps, CALLS, |_| Some(key.to_owned())).await {
        let response = result.expect("every call succeeds");
        if replayed(&response) == Some("true") {
            replays += 1;
        }
        ids.push(response.into_inner().task_id);
    }
    (ids, replays)
}

async fn concurrent_calls_with_one_key_create_exactly_one_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();

    let (ids, replays) = race(&[&app], &key).await;

    assert_eq!(ids.len(), CALLS);
    one_task_for_every_call(&db, &ids, replays).await;
}

/// Every call answered the same task, all but one as a replay, and the
/// database holds that one task and its one key record.
async fn one_task_for_every_call(db: &TestDb, ids: &[String], replays: usize) {
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "different task ids: {ids:?}"
    );
    assert_eq!(replays, CALLS - 1);
    assert_eq!(db.count("tasks").await, 1);
    assert_eq!(db.count("idempotency_keys").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_across_two_instances_create_exactly_one_task() {
    let db = TestDb::new(Backend::Postgres).await;
    // Both instances start together on a fresh database: migrations race too.
    let (one, two) = tokio::join!(
        TestApp::spawn_with(test_settings(&db.url)),
        TestApp::spawn_with(test_settings(&db.url))
    );
    let key = new_key();

    let (ids, replays) = race(&[&one, &two], &key).await;

    one_task_for_every_call(&db, &ids, replays).await;
}

async fn concurrent_calls_with_different_keys_each_create_a_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    let results = create_all_at_once(&[&app], CALLS, |_| Some(new_key())).await;

    for result in results {
        let response = result.expect("create");
        assert_eq!(replayed(&response), Some("false"));
    }
    assert_eq!(db.count("tasks").await, CALLS as i64);
    assert_eq!(db.count("idempotency_keys").await, CALLS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_together_create_a_missing_database_once() {
    let db = TestDb::uncreated_postgres().await;
    let mut settings = test_settings(&db.url);
    settings.database.create_database = true;

    let (one, two) = tokio::join!(
        TestApp::spawn_with(settings.clone()),
        TestApp::spawn_with(settings)
    );

    one.create(Some(&new_key()), email_request())
        .await
        .expect("the first instance serves");
    two.create(Some(&new_key()), email_request())
        .await
        .expect("the second instance serves");
}

conformance!(
    concurrent_calls_with_one_key_create_exactly_one_task,
    concurrent_calls_with_different_keys_each_create_a_task,
);
