//! Unit tests of the worker: no server needed.

use super::*;
use crate::RetryPolicy;

#[tokio::test]
async fn run_returns_after_shutdown_even_when_the_server_is_down() {
    // Nothing listens on port 9 of localhost: every lease fails.
    let worker =
        Worker::connect("http://127.0.0.1:9", WorkerOptions::new("w")).expect("a valid address");
    let handler = |_task: Task, _ctx: TaskContext| async { Ok(Value::Null) };
    let shutdown = tokio::time::sleep(Duration::from_millis(300));
    let ran = tokio::time::timeout(Duration::from_secs(5), worker.run(handler, shutdown)).await;
    assert!(matches!(ran, Ok(Ok(()))), "{ran:?}");
}

const TOKEN: &str = "oncely_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

#[tokio::test]
async fn every_request_carries_the_options_api_key() {
    use crate::metadata::AUTHORIZATION;
    let options = WorkerOptions {
        api_key: Some(TOKEN.into()),
        ..WorkerOptions::new("w")
    };
    let worker = Worker::connect("http://127.0.0.1:9", options).expect("valid");
    let call = worker.request(LeaseTasksRequest::default());
    let sent = call.metadata().get(AUTHORIZATION).expect("the header");
    assert_eq!(sent.to_str().expect("ascii"), format!("Bearer {TOKEN}"));
    let calls = Calls {
        client: worker.client(),
        policy: RetryPolicy::default(),
        lease_duration: Duration::from_secs(30),
        api_key: worker.api_key().expect("valid"),
    };
    let call = calls.request((), Duration::from_secs(1));
    assert_eq!(call.metadata().get(AUTHORIZATION), Some(sent));

    let open = Worker::connect("http://127.0.0.1:9", WorkerOptions::new("w")).expect("valid");
    assert!(open.request(()).metadata().get(AUTHORIZATION).is_none());
}

#[tokio::test]
async fn a_key_that_cannot_be_sent_is_refused_without_showing_it() {
    let options = WorkerOptions {
        api_key: Some("secret token".into()),
        ..WorkerOptions::new("w")
    };
    let refused = Worker::connect("http://127.0.0.1:9", options.clone());
    assert!(matches!(refused, Err(ClientError::InvalidApiKey)));
    let worker = Worker::new(lazy_channel("http://127.0.0.1:9").expect("valid"), options);
    assert!(!format!("{worker:?}").contains("secret"));
    let handler = |_task: Task, _ctx: TaskContext| async { Ok(Value::Null) };
    let ran = worker.run(handler, std::future::pending::<()>()).await;
    match ran {
        Err(error @ ClientError::InvalidApiKey) => {
            assert!(!error.to_string().contains("secret"))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn debug_of_a_worker_never_shows_the_key() {
    let options = WorkerOptions {
        api_key: Some(TOKEN.into()),
        ..WorkerOptions::new("w")
    };
    let worker = Worker::connect("http://127.0.0.1:9", options).expect("valid");
    let shown = format!("{worker:?}");
    assert!(
        !shown.contains(TOKEN) && !shown.contains("oncely_"),
        "{shown}"
    );
    assert!(shown.contains(r#"api_key: Some("***")"#), "{shown}");
}
