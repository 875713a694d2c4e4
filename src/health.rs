//! Health that reflects reality: SERVING only while the database answers
//! and can commit (on PostgreSQL, a commit that waits for a synchronous
//! standby when one is required).

use std::time::Duration;

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    proto::tasks_v1::{admin_server, task_service_server, worker_service_server},
    storage::Store,
};

/// The names whose status is reported: the whole server and each service,
/// by the generated servers' names.
pub const SERVICES: &[&str] = &[
    "",
    task_service_server::SERVICE_NAME,
    worker_service_server::SERVICE_NAME,
    admin_server::SERVICE_NAME,
];

/// Sets every name in [`SERVICES`] to `status`.
pub async fn set_all(reporter: HealthReporter, status: ServingStatus) {
    for name in SERVICES.iter().copied() {
        reporter.set_service_status(name, status).await;
    }
}

/// Forgets every name in [`SERVICES`], which ends open `Health/Watch`
/// streams (after they deliver the last status) so they do not hold up a
/// graceful shutdown.
pub async fn clear_all(mut reporter: HealthReporter) {
    for name in SERVICES.iter().copied() {
        reporter.clear_service_status(name).await;
    }
}

/// Pings the database every `interval` and reports SERVING or NOT_SERVING.
/// Runs until aborted.
pub async fn watch_database<S: Store>(store: S, reporter: HealthReporter, interval: Duration) {
    let timeout = interval.max(Duration::from_secs(1));
    let mut last = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let status = match tokio::time::timeout(timeout, store.ping()).await {
            Ok(Ok(())) => {
                let history = store.history();
                // Back (on a connection that survived, or a new one), or
                // trust ran out (the process was paused): where does the
                // database's history stand now?
                let known = history.is_trusted()
                    || match tokio::time::timeout(timeout, store.check_history()).await {
                        Ok(Ok(())) => true,
                        Ok(Err(error)) => {
                            tracing::debug!(error = %crate::telemetry::chain(&error), "cannot read where the database's history stands");
                            false
                        }
                        Err(_) => false,
                    };
                // What is remembered stays trusted until a little after the
                // next check should have answered.
                if known {
                    history.confirm(interval + timeout * 2);
                }
                ServingStatus::Serving
            }
            // The database may come back with another history (a failover,
            // a restore): nothing remembered of it is answered until a new
            // connection has shown where its history stands.
            Ok(Err(error)) => {
                store.history().distrust();
                if last != Some(ServingStatus::NotServing) {
                    tracing::warn!(error = %crate::telemetry::chain(&error), "database health check failed");
                }
                ServingStatus::NotServing
            }
            // Cannot commit now (a synchronous standby missing), or does not
            // answer.
            Err(_) => {
                store.history().distrust();
                if last != Some(ServingStatus::NotServing) {
                    tracing::warn!(
                        ?timeout,
                        "database health check timed out: it does not answer, or cannot commit now"
                    );
                }
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            tracing::info!(status = ?status, "health changed");
            set_all(reporter.clone(), status).await;
            last = Some(status);
        }
    }
}
