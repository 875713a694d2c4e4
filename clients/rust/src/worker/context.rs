//! What a handler knows about the attempt it runs, and how it learns that
//! it should stop.

use tokio::sync::watch;

use crate::proto::tasks_v1::Task;

/// Why the worker stopped working on a task while its handler ran. The
/// handler's result is then thrown away: the task is no longer this
/// worker's to complete or fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelReason {
    /// Someone called CancelTask; the task is CANCELLED.
    TaskCancelled,
    /// The lease ran out and the task went to another worker, or the task
    /// was finished or removed by someone else.
    LeaseLost,
}

/// Given to the handler with each task: which attempt it is, the key for
/// the side effect, and a signal that the worker stopped working on it.
///
/// Cheap to clone; clones share the signal.
#[derive(Debug, Clone)]
pub struct TaskContext {
    task_id: String,
    attempt: u32,
    signal: watch::Receiver<Option<CancelReason>>,
}

/// Cancels the [`TaskContext`] it was made with; see
/// [`TaskContext::standalone`].
#[derive(Debug)]
pub struct CancelHandle(watch::Sender<Option<CancelReason>>);

impl CancelHandle {
    /// Signals every clone of the context; the first reason given stays.
    pub fn cancel(&self, reason: CancelReason) {
        self.0.send_if_modified(|current| {
            let unset = current.is_none();
            if unset {
                *current = Some(reason);
            }
            unset
        });
    }
}

impl TaskContext {
    /// A context for `task` outside any worker, with the handle that
    /// cancels it: to call a handler from a test, or from your own loop.
    pub fn standalone(task: &Task) -> (Self, CancelHandle) {
        let (sender, signal) = watch::channel(None);
        let context = Self {
            task_id: task.task_id.clone(),
            attempt: u32::try_from(task.attempt).unwrap_or(0),
            signal,
        };
        (context, CancelHandle(sender))
    }

    /// The task's id.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// Which attempt this is: 1 for the first lease, higher after failed
    /// attempts and after leases that ran out.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The key to pass as the idempotency key of the side effect's own API
    /// (a payment provider's `Idempotency-Key`, a message id): the task id.
    ///
    /// Delivery is at least once. A worker can crash, or lose its lease,
    /// after the side effect and before CompleteTask reaches the server; the
    /// task is then handed to a worker again, and only a side effect keyed
    /// by this value still happens once.
    pub fn idempotency_key(&self) -> &str {
        &self.task_id
    }

    /// Whether the worker stopped working on this task; see
    /// [`cancelled`](Self::cancelled).
    pub fn is_cancelled(&self) -> bool {
        self.signal.borrow().is_some()
    }

    /// Why the worker stopped working on this task, if it did.
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        *self.signal.borrow()
    }

    /// Completes when the worker stops working on this task: it was
    /// cancelled, or its lease was lost. Stop as soon as you can (race it
    /// with your work in `tokio::select!`); whatever the handler returns
    /// afterwards is ignored, and a handler still running after the
    /// worker's `shutdown_grace` is aborted. Never completes otherwise.
    pub async fn cancelled(&self) -> CancelReason {
        let mut signal = self.signal.clone();
        loop {
            if let Some(reason) = *signal.borrow_and_update() {
                return reason;
            }
            if signal.changed().await.is_err() {
                // The worker is done with this task without cancelling it.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn task() -> Task {
        Task {
            task_id: "0b6c3f4e-8a3e-4d2b-9a51-6f0c2a7d9e11".into(),
            attempt: 2,
            ..Task::default()
        }
    }

    #[test]
    fn the_context_describes_the_attempt() {
        let (context, _handle) = TaskContext::standalone(&task());
        assert_eq!(context.task_id(), "0b6c3f4e-8a3e-4d2b-9a51-6f0c2a7d9e11");
        assert_eq!(context.idempotency_key(), context.task_id());
        assert_eq!(context.attempt(), 2);
        assert!(!context.is_cancelled());
    }

    #[tokio::test]
    async fn cancelling_wakes_every_clone_with_the_first_reason() {
        let (context, handle) = TaskContext::standalone(&task());
        let waiter = tokio::spawn({
            let context = context.clone();
            async move { context.cancelled().await }
        });
        handle.cancel(CancelReason::TaskCancelled);
        handle.cancel(CancelReason::LeaseLost);
        assert_eq!(waiter.await.unwrap(), CancelReason::TaskCancelled);
        assert!(context.is_cancelled());
        assert_eq!(context.cancel_reason(), Some(CancelReason::TaskCancelled));
    }

    #[tokio::test]
    async fn a_context_dropped_uncancelled_never_signals() {
        let (context, handle) = TaskContext::standalone(&task());
        drop(handle);
        let waited = tokio::time::timeout(Duration::from_millis(20), context.cancelled()).await;
        assert!(waited.is_err());
    }
}
