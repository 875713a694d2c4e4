//! Requests cancelled mid-flight leave no trace and no broken connection.

use crate::support::Backend;

use std::time::Duration;

use futures::future::join_all;

use crate::support::{
    TestApp, TestDb, email_request, eventually, keyed, new_key, replayed, test_settings,
};

async fn cancelled_requests_leave_no_half_written_state_and_traffic_goes_on(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    // A small pool makes a connection left inside a transaction show at once.
    settings.database.max_connections = 2;
    let app = TestApp::spawn_with(settings).await;
    let keys: Vec<String> = (0..60).map(|_| new_key()).collect();

    // Deadlines from 0 to 5 ms and client-side drops cut requests at every
    // stage: before the read, between statements, during the claim.
    let cancelled = keys.iter().enumerate().map(|(i, key)| {
        let mut client = app.tasks.clone();
        let key = key.clone();
        async move {
            let delay = Duration::from_micros((i as u64 % 12) * 500);
            if i % 2 == 0 {
                let mut request = keyed(Some(&key), email_request());
                request.set_timeout(delay.max(Duration::from_micros(100)));
                let _ = client.create_task(request).await;
            } else {
                let _ = tokio::time::timeout(
                    delay,
                    client.create_task(keyed(Some(&key), email_request())),
                )
                .await;
            }
        }
    });
    join_all(cancelled).await;

    // Every key is either fully there (record and task) or not at all,
    // whenever it is looked at: the server may still be finishing
    // requests whose callers left, so each check reads one snapshot.
    assert_eq!(db.orphans().await, (0, 0));
    let (survived, records) = db.tasks_and_keys().await;
    assert!(survived < keys.len() as i64, "no request was cancelled");
    assert_eq!(survived, records);
    if backend == Backend::Postgres {
        // No pooled connection was left inside a transaction: one may be
        // between two statements of a request still running, but not stay.
        eventually(
            Duration::from_secs(30),
            "no connection idle in a transaction",
            || async {
                let idle_in_transaction: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND application_name = 'oncely' AND state LIKE 'idle in transaction%'",
                )
                .fetch_one(db.pg_pool())
                .await
                .expect("activity");
                (idle_in_transaction == 0).then_some(())
            },
        )
        .await;
    }

    // Normal traffic: each key now creates or replays, exactly one task each.
    for key in &keys {
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            app.create(Some(key), email_request()),
        )
        .await
        .expect("no request hangs on a broken connection")
        .expect("retry after cancellation");
        assert!(replayed(&response).is_some());
    }
    assert_eq!(db.count("tasks").await, keys.len() as i64);
    assert_eq!(db.count("idempotency_keys").await, keys.len() as i64);
}

conformance!(cancelled_requests_leave_no_half_written_state_and_traffic_goes_on,);
