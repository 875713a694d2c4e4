//! Wake-ups for those who wait on tasks: new work for long-polling workers,
//! finished tasks for WaitTask. Each store raises them when its writes
//! commit, in process; PostgreSQL also sends them through `LISTEN/NOTIFY`
//! so every instance hears of every change. They are hints, never the
//! truth: a waiter re-reads the database after each one, and at least
//! every `QUEUE_RECHECK_INTERVAL` anyway, so a lost wake-up costs that
//! interval, not a result.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::{Notify, broadcast};
use uuid::Uuid;

/// How many finished task ids are buffered for slow waiters; one that falls
/// further behind re-reads instead.
const FINISHED_BUFFER: usize = 1024;

/// The wake-ups of one store.
#[derive(Debug, Clone)]
pub struct TaskEvents {
    ready: Arc<Notify>,
    finished: broadcast::Sender<Uuid>,
    /// Set when the server begins to shut down: waiters answer at once.
    draining: Arc<AtomicBool>,
}

impl Default for TaskEvents {
    fn default() -> Self {
        Self {
            ready: Arc::new(Notify::new()),
            finished: broadcast::channel(FINISHED_BUFFER).0,
            draining: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl TaskEvents {
    /// A task may be leasable now: wakes every waiting worker.
    pub fn task_ready(&self) {
        self.ready.notify_waiters();
    }

    /// A task ended (succeeded, failed or was cancelled).
    pub fn task_finished(&self, task_id: Uuid) {
        // No receiver means nobody waits.
        let _ = self.finished.send(task_id);
    }

    /// Something may have happened that no event told of (a reconnect):
    /// wakes every waiter to re-read.
    pub fn anything(&self) {
        self.task_ready();
        let _ = self.finished.send(Uuid::nil());
    }

    /// The server is shutting down: every waiter answers now with what it
    /// has, so long polls do not hold the shutdown for their whole wait.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.anything();
    }

    /// Whether [`drain`](Self::drain) was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The signal of [`task_ready`](Self::task_ready). Create the future
    /// (and `enable` it) before reading the database, so a wake-up between
    /// the read and the wait is not lost.
    pub fn ready(&self) -> &Notify {
        &self.ready
    }

    /// A stream of finished task ids (the nil id: re-read whatever you
    /// wait for). Subscribe before reading the database.
    pub fn finished(&self) -> broadcast::Receiver<Uuid> {
        self.finished.subscribe()
    }
}
