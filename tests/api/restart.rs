//! Replays survive a crash: the record lives in PostgreSQL, not in memory.

use crate::support::Backend;

use crate::support::{CREATE_TASK_PATH, TestApp, TestDb, email_request, new_key, replayed};
use prost::Message;

async fn a_retry_after_the_server_crashed_and_restarted_replays_the_first_response(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let key = new_key();
    let body = email_request().encode_to_vec();
    let before = TestApp::spawn(&db).await;
    let first = before
        .raw_call(CREATE_TASK_PATH, Some(&key), body.clone())
        .await
        .expect("create");
    before.kill().await;

    let after = TestApp::spawn(&db).await;
    let retry = after
        .raw_call(CREATE_TASK_PATH, Some(&key), body)
        .await
        .expect("replay");

    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(db.count("tasks").await, 1);
}

conformance!(a_retry_after_the_server_crashed_and_restarted_replays_the_first_response,);
