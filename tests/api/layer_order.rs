//! The order of the gates every call passes through (`src/api/stack.rs`):
//! each test fails if two gates trade places, by a refusal that only the
//! written order gives.

use std::num::NonZeroU32;

use oncely::auth::AuthMode;
use tonic::{Code, Status};

use crate::support::{
    Backend, BinaryApp, TestApp, TestDb, assert_status, email_request, rpc, scrape_until,
    test_settings, value,
};

/// A key no server accepts: a space is outside visible ASCII.
const MALFORMED_KEY: &str = "not a key";

/// CreateTask with [`MALFORMED_KEY`], until a call is refused for another
/// reason than its key (at most 100): how many were refused for the key
/// first, and that refusal.
async fn bad_keys_until_refused_otherwise(app: &TestApp) -> (u32, Status) {
    let mut for_the_key = 0;
    for _ in 0..100 {
        match app.create(Some(MALFORMED_KEY), email_request()).await {
            Err(status) if status.code() == Code::InvalidArgument => for_the_key += 1,
            Err(status) => return (for_the_key, status),
            Ok(_) => panic!("a malformed key was accepted"),
        }
    }
    panic!("100 calls in a row were refused for their key only")
}

#[tokio::test]
async fn who_calls_is_checked_before_the_idempotency_key() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.auth = AuthMode::Required;
    let app = TestApp::spawn_with(settings).await;

    let refused = app.create(Some(MALFORMED_KEY), email_request()).await;

    // The API key gate sits above the idempotency key gate.
    assert_status(refused, Code::Unauthenticated, Some("API_KEY_INVALID"));
}

#[tokio::test]
async fn calls_with_a_bad_idempotency_key_count_against_the_callers_rate() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.rate_limits.per_second = NonZeroU32::new(1);
    settings.rate_limits.burst = NonZeroU32::new(2).expect("two");
    let app = TestApp::spawn_with(settings).await;

    let (for_the_key, refused) = bad_keys_until_refused_otherwise(&app).await;

    // The rate gate sits above the idempotency key gate: the burst is
    // refused for its key, and then the rate refuses.
    assert!(for_the_key >= 2, "{for_the_key} refused for the key first");
    assert_status(
        Err::<(), _>(refused),
        Code::ResourceExhausted,
        Some("RATE_LIMITED"),
    );
}

#[tokio::test]
async fn calls_refused_by_a_gate_are_counted_with_their_status() {
    let db = TestDb::new(Backend::Sqlite).await;
    let app = BinaryApp::start(&db, &[("RATE_LIMIT", "1"), ("RATE_BURST", "1")]).await;

    let (_, refused) = bad_keys_until_refused_otherwise(&app).await;

    // The metrics are outermost: the refusals of the rate gate and of the
    // idempotency key gate under it are counted, each with its own code.
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let handled = |code| {
        let mut labels = rpc("tasks.v1.TaskService", "CreateTask");
        labels.push(("grpc_code", code));
        labels
    };
    scrape_until(&app.metrics, "refusals to be counted", |scrape| {
        let count = |code| value(scrape, "grpc_server_handled_total", &handled(code));
        count("ResourceExhausted") >= Some(1.0) && count("InvalidArgument") >= Some(1.0)
    })
    .await;
}
