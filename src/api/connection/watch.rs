//! What one connection knows of its calls: each open call's deadline, and
//! since when none has been open; the connection's deadline follows.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    task::Waker,
    time::Duration,
};

use tokio::time::Instant;

/// How long connections and calls may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How long a connection may stay open without a call.
    pub idle_timeout: Duration,
    /// How long a call may stay open, answer sent included.
    pub call_limit: Duration,
    /// How long an endless stream (health `Watch`) may stay open.
    pub stream_limit: Duration,
}

/// The calls open on one connection.
#[derive(Debug)]
struct Calls {
    /// Each open call's deadline, by the order it started; endless
    /// streams' deadlines are later than the order says.
    open: BTreeMap<u64, Instant>,
    next: u64,
    /// When the last call ended (or the connection was accepted).
    idle_since: Instant,
    /// The connection's task, to wake when a deadline moves earlier.
    waker: Option<Waker>,
}

/// What [`super::GuardedIo`] and [`super::TrackCalls`] share about one
/// connection.
#[derive(Debug)]
pub(super) struct Watch {
    limits: ConnectionLimits,
    calls: Mutex<Calls>,
}

impl Watch {
    /// The watch of a connection accepted now, with no call open yet.
    pub(super) fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            calls: Mutex::new(Calls {
                open: BTreeMap::new(),
                next: 0,
                idle_since: Instant::now(),
                waker: None,
            }),
        })
    }

    /// When the connection must be closed, if nothing changes; `waker` is
    /// woken when that moves earlier.
    pub(super) fn deadline_waking(&self, waker: &Waker) -> Instant {
        let mut calls = self.calls();
        calls.waker = Some(waker.clone());
        Self::deadline(&calls, self.limits)
    }

    fn calls(&self) -> MutexGuard<'_, Calls> {
        // The lock guards plain bookkeeping that no panic leaves half-done.
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// When the connection must be closed, if nothing changes.
    fn deadline(calls: &Calls, limits: ConnectionLimits) -> Instant {
        match calls.open.values().min() {
            Some(first) => *first,
            None => calls.idle_since + limits.idle_timeout,
        }
    }

    /// Registers a call; it stays open until the returned guard drops.
    pub(super) fn open(self: &Arc<Self>, endless: bool) -> CallGuard {
        let mut calls = self.calls();
        let before = Self::deadline(&calls, self.limits);
        let id = calls.next;
        calls.next += 1;
        let limit = if endless {
            self.limits.stream_limit
        } else {
            self.limits.call_limit
        };
        calls.open.insert(id, Instant::now() + limit);
        if Self::deadline(&calls, self.limits) < before
            && let Some(waker) = calls.waker.take()
        {
            waker.wake();
        }
        CallGuard {
            watch: Arc::clone(self),
            id,
        }
    }
}

/// Keeps a call registered on its connection while it lives.
#[derive(Debug)]
pub struct CallGuard {
    watch: Arc<Watch>,
    id: u64,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut calls = self.watch.calls();
        calls.open.remove(&self.id);
        if calls.open.is_empty() {
            calls.idle_since = Instant::now();
            if let Some(waker) = calls.waker.take() {
                waker.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            idle_timeout: Duration::from_secs(60),
            call_limit: Duration::from_secs(10),
            stream_limit: Duration::from_secs(3600),
        }
    }

    fn watch() -> Arc<Watch> {
        Watch::new(limits())
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_follows_the_oldest_open_call_then_idleness() {
        let watch = watch();
        let start = Instant::now();
        let deadline = || Watch::deadline(&watch.calls(), watch.limits);
        assert_eq!(deadline(), start + limits().idle_timeout);

        let first = watch.open(false);
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = watch.open(false);
        assert_eq!(deadline(), start + limits().call_limit);
        drop(first);
        assert_eq!(
            deadline(),
            start + Duration::from_secs(1) + limits().call_limit
        );
        drop(second);
        assert_eq!(
            deadline(),
            start + Duration::from_secs(1) + limits().idle_timeout
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_stream_has_a_limit_of_its_own() {
        let watch = watch();
        let start = Instant::now();
        let stream = watch.open(true);
        assert_eq!(
            Watch::deadline(&watch.calls(), watch.limits),
            start + limits().stream_limit
        );
        let call = watch.open(false);
        assert_eq!(
            Watch::deadline(&watch.calls(), watch.limits),
            start + limits().call_limit
        );
        drop(call);
        drop(stream);
    }
}
