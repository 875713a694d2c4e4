//! Notifications of finished tasks, sent after their commit and in batches.
//!
//! PostgreSQL serializes the commits of transactions that NOTIFY (they
//! take one lock on the notification queue through commit, WAL flush
//! included), so a NOTIFY inside each CompleteTask's statement would let
//! one completion commit at a time. Instead the completion commits alone,
//! then its task id is queued here, and one statement that writes nothing
//! (so flushes nothing) notifies every queued id. Waiters on every instance
//! also re-read now and then, so a notification lost with a connection
//! delays a waiter, never strands it.

use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

/// The most ids notified by one statement.
const MAX_BATCH: usize = 1024;
/// How many ids may wait before completions wait to queue theirs.
const QUEUE: usize = 8192;

/// A handle on the notifying task; cloning it shares the task.
#[derive(Debug, Clone)]
pub(super) struct FinishedNotifier {
    queue: mpsc::Sender<Uuid>,
}

impl FinishedNotifier {
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
        let _ = self.queue.send(task_id).await;
    }
}

async fn run(pool: PgPool, mut ids: mpsc::Receiver<Uuid>) {
    while let Some(first) = ids.recv().await {
        let mut batch = vec![first.to_string()];
        while batch.len() < MAX_BATCH {
            match ids.try_recv() {
                Ok(id) => batch.push(id.to_string()),
                Err(_) => break,
            }
        }
        let sent = sqlx::query(
            "SELECT pg_notify('oncely_tasks', 'finished:' || id) FROM unnest($1::text[]) AS id",
        )
        .bind(&batch)
        .execute(&pool)
        .await;
        if let Err(error) = sent {
            tracing::debug!(%error, tasks = batch.len(), "could not notify finished tasks; waiters will re-read");
        }
    }
}
