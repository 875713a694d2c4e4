//! The operators' HTTP listener, on `METRICS_ADDR` when it is set:
//! `GET /metrics`, every metric in the Prometheus text format. It also
//! reads the queue (tasks by status, the oldest wait) from the database
//! every `METRICS_QUEUE_INTERVAL`, so a scrape never touches the database
//! and many instances cost one small query each per interval.

use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    metrics::{StateLabels, StatusLabels, TASK_STATUSES, metrics},
    storage::Store,
};

/// The content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The running listener and queue reader; both stop when it is dropped.
#[derive(Debug)]
pub struct OpsListener {
    server: JoinHandle<()>,
    sampler: JoinHandle<()>,
}

impl Drop for OpsListener {
    fn drop(&mut self) {
        self.server.abort();
        self.sampler.abort();
    }
}

/// Serves `/metrics` on `listener` and reads the queue every
/// `queue_interval`.
pub fn start<S: Store>(store: S, listener: TcpListener, queue_interval: Duration) -> OpsListener {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics on /metrics");
    }
    let router = Router::new()
        .route("/metrics", get(metrics_text::<S>))
        .with_state(store.clone());
    let server = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the metrics listener stopped");
        }
    });
    let sampler = tokio::spawn(read_queue(store, queue_interval));
    OpsListener { server, sampler }
}

/// Binds `addr` for [`start`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn metrics_text<S: Store>(State(store): State<S>) -> impl IntoResponse {
    let metrics = metrics();
    // The pool's state is read at each scrape: it costs nothing.
    let (in_use, idle) = store.connections();
    metrics
        .db_connections
        .get_or_create(&StateLabels { state: "in_use" })
        .set(i64::from(in_use));
    metrics
        .db_connections
        .get_or_create(&StateLabels { state: "idle" })
        .set(i64::from(idle));
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], metrics.encode())
}

/// Reads the queue into the metrics every `interval`; a failed read keeps
/// the last figures and is logged.
async fn read_queue<S: Store>(store: S, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match store.queue_stats().await {
            Ok(stats) => {
                let metrics = metrics();
                for (status, count) in TASK_STATUSES.into_iter().zip(stats.by_status) {
                    metrics
                        .tasks
                        .get_or_create(&StatusLabels { status })
                        .set(count);
                }
                metrics.oldest_queued_age.set(stats.oldest_ready_seconds);
            }
            Err(error) => {
                tracing::warn!(error = %crate::telemetry::chain(&error), "could not read the queue for the metrics");
            }
        }
    }
}
