//! Notifications to every instance (a task is ready, a task finished),
//! sent after the commit of what they announce, and in batches.
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

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

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
        let _ = self.queue.send(format!("finished:{task_id}")).await;
    }

    /// Queues the notification that a task may be leasable.
    pub(super) async fn ready(&self) {
        let _ = self.queue.send("ready".to_owned()).await;
    }
}

async fn run(pool: PgPool, mut payloads: mpsc::Receiver<String>) {
    while let Some(first) = payloads.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match payloads.try_recv() {
                Ok(payload) if !batch.contains(&payload) => batch.push(payload),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let sent = sqlx::query(
            "SELECT pg_notify('oncely_tasks', payload) FROM unnest($1::text[]) AS payload",
        )
        .bind(&batch)
        .execute(&pool)
        .await;
        if let Err(error) = sent {
            tracing::debug!(%error, notifications = batch.len(), "could not notify; waiters will re-read");
        }
        tokio::time::sleep(GAP).await;
    }
}
