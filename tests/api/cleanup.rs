//! Retention and Cleanup.

use crate::support::Backend;

use std::time::Duration;

use oncely::proto::tasks_v1::CleanupRequest;

use crate::support::{
    TestApp, TestDb, assert_invalid, email_request, new_key, replayed, test_settings, uncached,
    violated_fields,
};

const HOUR: Duration = Duration::from_secs(3600);

async fn cleanup_deletes_only_older_records_and_never_tasks(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_uncached(&db).await;
    let old_key = new_key();
    app.create_with_key(&old_key).await;
    db.age_keys(2 * HOUR).await;
    let fresh_key = new_key();
    app.create_with_key(&fresh_key).await;

    let deleted = app.cleanup(Some(HOUR)).await.expect("cleanup");

    assert_eq!(deleted, 1);
    let left = db.keys().await;
    assert_eq!(left, [fresh_key]);
    assert_eq!(db.count("tasks").await, 2);
}

async fn a_deleted_key_executes_afresh(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_uncached(&db).await;
    let key = new_key();
    let first = app.create_with_key(&key).await.into_inner();
    db.age_keys(2 * HOUR).await;

    let deleted = app.cleanup(Some(HOUR)).await.expect("cleanup");
    let again = app
        .create(Some(&key), email_request())
        .await
        .expect("create again");

    assert_eq!(deleted, 1);
    assert_eq!(db.count("idempotency_keys").await, 1);
    assert_eq!(replayed(&again), Some("false"));
    assert_ne!(again.into_inner().task_id, first.task_id);
    assert_eq!(db.count("tasks").await, 2);
}

async fn cleanup_refuses_to_delete_records_younger_than_the_retention(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    app.create_email().await;

    let status = assert_invalid(
        app.cleanup(Some(Duration::from_secs(60))).await,
        "INVALID_REQUEST",
    );

    assert_eq!(violated_fields(&status), ["older_than"]);
    assert!(status.message().contains("retention"), "{status:?}");
    assert_eq!(db.count("idempotency_keys").await, 1);
}

async fn cleanup_accepts_durations_with_nanoseconds(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_uncached(&db).await;
    app.create_email().await;
    db.age_keys(2 * HOUR).await;

    let deleted = app
        .admin
        .clone()
        .cleanup(CleanupRequest {
            older_than: Some(prost_types::Duration {
                seconds: HOUR.as_secs() as i64,
                nanos: 1,
            }),
        })
        .await
        .expect("cleanup")
        .into_inner()
        .deleted;

    assert_eq!(deleted, 1);
}

async fn cleanup_works_in_batches_until_all_old_records_are_gone(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.cleanup_batch_size = 2;
    let app = TestApp::spawn_with(uncached(settings)).await;
    for _ in 0..5 {
        app.create_email().await;
    }
    db.age_keys(2 * HOUR).await;

    let deleted = app.cleanup(Some(HOUR)).await.expect("cleanup");

    assert_eq!(deleted, 5);
    assert_eq!(db.count("idempotency_keys").await, 0);
}

async fn cleanup_without_older_than_uses_the_retention(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.retention = 3 * HOUR;
    let app = TestApp::spawn_with(uncached(settings)).await;
    app.create_email().await;
    db.age_keys(2 * HOUR).await;
    app.create_email().await;
    db.age_keys(2 * HOUR).await;

    let deleted = app.cleanup(None).await.expect("cleanup");

    assert_eq!(deleted, 1, "only the record aged 4h is past a 3h retention");
    assert_eq!(db.count("idempotency_keys").await, 1);
}

async fn a_negative_older_than_is_invalid(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    app.create_email().await;

    let status = assert_invalid(
        app.admin
            .clone()
            .cleanup(CleanupRequest {
                older_than: Some(prost_types::Duration {
                    seconds: -60,
                    nanos: 0,
                }),
            })
            .await,
        "INVALID_REQUEST",
    );

    assert_eq!(violated_fields(&status), ["older_than"]);
    assert_eq!(db.count("idempotency_keys").await, 1);
}

async fn a_record_older_than_the_retention_is_treated_as_absent_before_cleanup(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.retention = HOUR;
    let app = TestApp::spawn_with(uncached(settings)).await;
    let key = new_key();
    let first = app.create_with_key(&key).await.into_inner();
    db.age_keys(2 * HOUR).await;

    let again = app
        .create(Some(&key), email_request())
        .await
        .expect("executes afresh");
    let retry = app
        .create(Some(&key), email_request())
        .await
        .expect("replays the new task");

    assert_eq!(replayed(&again), Some("false"));
    let again = again.into_inner();
    assert_ne!(again.task_id, first.task_id);
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.into_inner(), again);
    assert_eq!(db.count("tasks").await, 2);
    assert_eq!(db.count("idempotency_keys").await, 1);
}

async fn an_expired_record_does_not_refuse_a_different_request(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.retention = HOUR;
    let app = TestApp::spawn_with(uncached(settings)).await;
    let key = new_key();
    app.create_with_key(&key).await;
    db.age_keys(2 * HOUR).await;

    let other = crate::support::request("agent-7", "send_sms", serde_json::json!({}));
    let response = app
        .create(Some(&key), other)
        .await
        .expect("a new request under an expired key");

    assert_eq!(replayed(&response), Some("false"));
}

conformance!(
    cleanup_deletes_only_older_records_and_never_tasks,
    a_deleted_key_executes_afresh,
    cleanup_refuses_to_delete_records_younger_than_the_retention,
    cleanup_accepts_durations_with_nanoseconds,
    cleanup_works_in_batches_until_all_old_records_are_gone,
    cleanup_without_older_than_uses_the_retention,
    a_negative_older_than_is_invalid,
    a_record_older_than_the_retention_is_treated_as_absent_before_cleanup,
    an_expired_record_does_not_refuse_a_different_request,
);
