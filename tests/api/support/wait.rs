//! Waiting for a condition without sleeping blindly.

use std::time::Duration;

use tonic::{Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How often a condition is checked.
const POLL: Duration = Duration::from_millis(50);

/// Calls `check` every 50 ms until it gives `Some`, and returns that value.
/// Panics after `within`, naming `what` was awaited.
#[track_caller]
pub(crate) fn eventually<T, Fut>(
    within: Duration,
    what: impl std::fmt::Display,
    mut check: impl FnMut() -> Fut,
) -> impl Future<Output = T>
where
    Fut: Future<Output = Option<T>>,
{
    let caller = std::panic::Location::caller();
    async move {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{caller}: gave up after {within:?} waiting for {what}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The health `channel`'s server reports for `service` ("" for the whole
/// server).
pub(crate) async fn health(channel: &Channel, service: &str) -> Result<ServingStatus, Status> {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Whether the server at `url` answers health checks with SERVING now.
pub(crate) async fn is_serving(url: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_owned()) else {
        return false;
    };
    match endpoint.connect().await {
        Ok(channel) => matches!(health(&channel, "").await, Ok(ServingStatus::Serving)),
        Err(_) => false,
    }
}
