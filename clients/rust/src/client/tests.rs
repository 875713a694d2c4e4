//! Unit tests of the client: no server needed.

use super::*;

#[test]
fn keys_the_server_would_refuse_are_refused_before_sending() {
    assert!(key_metadata("0b6c3f4e-8a3e-4d2b-9a51-6f0c2a7d9e11").is_ok());
    assert!(matches!(key_metadata(""), Err(ClientError::InvalidKey)));
    assert!(matches!(key_metadata("a b"), Err(ClientError::InvalidKey)));
    assert!(matches!(
        key_metadata(&"k".repeat(256)),
        Err(ClientError::InvalidKey)
    ));
}

const TOKEN: &str = "oncely_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

#[tokio::test]
async fn every_request_carries_the_api_key_once_set() {
    use crate::metadata::AUTHORIZATION;
    let open = OncelyClient::connect("http://127.0.0.1:9").expect("a valid address");
    assert!(!open.has_api_key());
    let call = open.request(GetTaskRequest::default());
    assert!(call.metadata().get(AUTHORIZATION).is_none());

    let keyed = open.with_api_key(TOKEN).expect("a valid token");
    assert!(keyed.has_api_key());
    let call = keyed.request(GetTaskRequest::default());
    let sent = call.metadata().get(AUTHORIZATION).expect("the header");
    assert_eq!(sent.to_str().expect("ascii"), format!("Bearer {TOKEN}"));
    // Clones share it, as the retry loop's attempts do.
    let clone = keyed.clone();
    assert!(clone.request(()).metadata().get(AUTHORIZATION).is_some());
}

#[tokio::test]
async fn an_invalid_token_is_refused_without_showing_it() {
    let client = OncelyClient::connect("http://127.0.0.1:9").expect("a valid address");
    let error = client
        .with_api_key("secret token")
        .expect_err("a space cannot be sent");
    assert!(matches!(error, ClientError::InvalidApiKey));
    assert!(!format!("{error} {error:?}").contains("secret"));
}

#[tokio::test]
async fn debug_shows_that_there_is_a_key_but_not_the_key() {
    let client = OncelyClient::connect("http://127.0.0.1:9")
        .expect("a valid address")
        .with_api_key(TOKEN)
        .expect("a valid token");
    let shown = format!("{client:?}");
    assert!(shown.contains(r#"api_key: Some("***")"#), "{shown}");
    assert!(
        !shown.contains(TOKEN) && !shown.contains("oncely_"),
        "{shown}"
    );
    let alternate = format!("{client:#?}");
    assert!(!alternate.contains(TOKEN), "{alternate}");
}

#[test]
fn only_succeeded_failed_and_cancelled_are_finished() {
    let with = |status: TaskStatus| Task {
        status: status.into(),
        ..Task::default()
    };
    assert!(is_finished(&with(TaskStatus::Succeeded)));
    assert!(is_finished(&with(TaskStatus::Failed)));
    assert!(is_finished(&with(TaskStatus::Cancelled)));
    assert!(!is_finished(&with(TaskStatus::Queued)));
    assert!(!is_finished(&with(TaskStatus::Running)));
    assert!(!is_finished(&with(TaskStatus::Unspecified)));
}

#[tokio::test]
async fn tls_options_are_for_https_addresses_only() {
    assert!(OncelyClient::connect("https://oncely.example:443").is_ok());
    let misplaced = OncelyClient::connect_with_tls(
        "http://127.0.0.1:50051",
        &TlsOptions {
            ca_pem: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
            identity_pem: None,
        },
    );
    assert!(
        matches!(misplaced, Err(ClientError::Tls(_))),
        "{misplaced:?}"
    );
}
