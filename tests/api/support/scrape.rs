//! Reading a binary's Prometheus metrics (METRICS_ADDR): a real HTTP
//! scrape, parsed as the text format. Only a child process's metrics are
//! a test's own: in-process servers share one registry with every test
//! running at the same time.

use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};

use super::eventually;

/// Scrapes `url` until `ready` holds for the scrape (at most 30 s).
pub(crate) async fn scrape_until(url: &str, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    eventually(Duration::from_secs(30), what, || async {
        let scrape = scrape(url).await;
        ready(&scrape).then_some(scrape)
    })
    .await
}

/// One scrape of `url`, checked to be the Prometheus text format.
pub(crate) async fn scrape(url: &str) -> Scrape {
    let response = reqwest::get(url).await.expect("scrape /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.expect("read /metrics");
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

/// The value of the sample `name` whose labels include `labels`: a
/// counter's or gauge's value, or a histogram's count.
pub(crate) fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matches = |sample: &&Sample| {
        sample.metric == name && labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
    };
    scrape.samples.iter().find(matches).map(|s| match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
        Value::Summary(_) => f64::NAN,
    })
}

/// The labels of a unary call of `service`'s `method` in the RPC metrics.
pub(crate) fn rpc<'a>(service: &'a str, method: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grpc_type", "unary"),
        ("grpc_service", service),
        ("grpc_method", method),
    ]
}

/// Waits until the binary whose metrics are at `url` has counted `calls`
/// calls of `service`'s `method` started: they reached the server and are
/// in its hands.
pub(crate) async fn started(url: &str, service: &str, method: &str, calls: usize) {
    let labels = rpc(service, method);
    scrape_until(url, &format!("{calls} {method} calls to start"), |scrape| {
        value(scrape, "grpc_server_started_total", &labels) >= Some(calls as f64)
    })
    .await;
}
