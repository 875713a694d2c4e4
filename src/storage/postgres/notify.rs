//! Notifications to every instance (a task is ready, a task finished),
//! sent after the commit of what they announce, and in batches. Every
//! write that makes a task leasable or ends one (create, lease, complete,
//! fail, cancel) commits first and then queues its notification here; no
//! statement calls `pg_notify` itself.
//!
//! PostgreSQL serializes the commits of transactions that NOTIFY (they
//! take one lock on the notification queue through commit, WAL flush
//! included), so a NOTIFY inside each create's or completion's statement
//! let one of them commit at a time (creates ran at half the rate, and
//! slower as the run went on). Instead each commits alone, then its
//! notification is queued here, and one statement that writes nothing (so
//! flushes nothing) sends every queued one, each payload once, at most
//! every `GAP` (a NOTIFY still commits, and commits contend). The instance
//! that made the change wakes its own waiters at once, without the
//! database; other instances hear within `GAP`. Waiters and lease pollers
//! on every instance also re-read now and then, so a notification lost
//! with a connection delays them, never strands them.

use std::{collections::HashSet, time::Duration};

use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

/// The channel every instance listens on (see `listener.rs`).
pub(super) const CHANNEL: &str = "oncely_tasks";
/// The payload that says a task may be leasable.
pub(super) const READY: &str = "ready";
/// The prefix of the payload that says a task ended: `finished:<task_id>`.
pub(super) const FINISHED: &str = "finished:";

/// The least time between two notifying statements.
const GAP: Duration = Duration::from_millis(5);

/// The most notifications sent by one statement.
const MAX_BATCH: usize = 1024;
/// How many notifications may wait before their senders wait to queue.
const QUEUE: usize = 8192;

/// A handle on the notifying task; cloning it shares the task.
#[derive(Debug, Clone)]
pub(super) struct Notifier {
    queue: mpsc::Sender<String>,
}

impl Notifier {
    /// Starts the notifying task on `pool`; it ends when every handle is
    /// dropped.
    pub(super) fn start(pool: PgPool) -> Self {
        let (queue, ids) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, ids));
        Self { queue }
    }

    /// Queues the notification that `task_id` finished.
    pub(super) async fn finished(&self, task_id: Uuid) {
        // Only fails once the store is gone.
        let _ = self.queue.send(format!("{FINISHED}{task_id}")).await;
    }

    /// Queues the notification that a task may be leasable.
    pub(super) async fn ready(&self) {
        let _ = self.queue.send(READY.to_owned()).await;
    }
}

async fn run(pool: PgPool, mut payloads: mpsc::Receiver<String>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Waits for one, then takes what else is queued, up to the cap; none:
    // every sender is gone.
    while payloads.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Each payload once: a waiter needs one wake-up per change.
        let mut seen = HashSet::new();
        batch.retain(|payload| seen.insert(payload.clone()));
        let sent = sqlx::query("SELECT pg_notify($2, payload) FROM unnest($1::text[]) AS payload")
            .bind(&batch)
            .bind(CHANNEL)
            .execute(&pool)
            .await;
        if let Err(error) = sent {
            tracing::debug!(%error, notifications = batch.len(), "could not notify; waiters will re-read");
        }
        batch.clear();
        tokio::time::sleep(GAP).await;
    }
}
