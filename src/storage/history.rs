//! What this instance knows of the database's history, so that it never
//! answers from memory a record the database may no longer hold.
//!
//! A PostgreSQL failover promotes a standby, which starts a new timeline;
//! with asynchronous replication, or after a restore from a backup, the
//! database then lacks commits this instance saw (and may have answered).
//! Every new connection (the request pool's, the health check's, the
//! listener's after it reconnects) reads the database's identity: its
//! system identifier, its timeline and its WAL position. Another system,
//! another timeline, or a WAL position behind one seen on the same timeline
//! is a change of history: the epoch moves on, and the replay cache, whose
//! entries carry the epoch they were read in, answers from none of them
//! again. Trust is also a lease: it lasts a little longer than the health
//! check's period, each answer of the health check (or a new connection)
//! renews it, and a failed check ends it. So an instance that could not see
//! the database for a while (it was out of reach, or the process itself
//! was paused through a failover) answers nothing from memory until it has
//! looked again.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How long trust lasts when nothing has said otherwise (the health check
/// sets it from its period).
const DEFAULT_TRUST: Duration = Duration::from_secs(3);

/// Where the database's history stands, as one connection saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `pg_control_system().system_identifier`: another cluster (a new
    /// `initdb`, a different server) has another.
    pub system: String,
    /// The current timeline, `None` on a standby (which cannot take this
    /// instance's writes anyway).
    pub timeline: Option<i64>,
    /// The current WAL position in bytes, `None` on a standby.
    pub wal: Option<i64>,
}

/// This instance's view of the database's history; cloning it shares it.
/// [`untracked`](Self::untracked) (the default, as for SQLite, whose file
/// has one history) is always trusted and never changes.
#[derive(Debug, Clone, Default)]
pub struct DatabaseHistory {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    epoch: AtomicU64,
    /// Trusted until this many nanoseconds after `origin` (0: not).
    trusted_until: AtomicU64,
    /// How long a renewal of trust lasts, in nanoseconds.
    trust_for: AtomicU64,
    origin: Instant,
    seen: Mutex<Option<Identity>>,
}

impl Inner {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn renew(&self) {
        let until = self
            .now()
            .saturating_add(self.trust_for.load(Ordering::SeqCst))
            .max(1);
        self.trusted_until.store(until, Ordering::SeqCst);
    }
}

impl DatabaseHistory {
    /// A history that connections report to, trusted once the first of
    /// them has.
    pub fn tracked() -> Self {
        Self {
            inner: Some(Arc::new(Inner {
                epoch: AtomicU64::new(0),
                trusted_until: AtomicU64::new(0),
                trust_for: AtomicU64::new(
                    u64::try_from(DEFAULT_TRUST.as_nanos()).unwrap_or(u64::MAX),
                ),
                origin: Instant::now(),
                seen: Mutex::new(None),
            })),
        }
    }

    /// A history that never changes.
    pub fn untracked() -> Self {
        Self::default()
    }

    /// How many changes of history this instance has seen.
    pub fn epoch(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |inner| inner.epoch.load(Ordering::SeqCst))
    }

    /// Whether what was read in the current epoch may be answered from
    /// memory: only while trust lasts (see the module's notes), never
    /// before any connection has been made.
    pub fn is_trusted(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(|inner| inner.now() < inner.trusted_until.load(Ordering::SeqCst))
    }

    /// The database answered on a connection whose history was read: trust
    /// lasts `trust_for` more (and each renewal from now on as long).
    pub fn confirm(&self, trust_for: Duration) {
        if let Some(inner) = &self.inner {
            let nanos = u64::try_from(trust_for.as_nanos()).unwrap_or(u64::MAX);
            inner.trust_for.store(nanos, Ordering::SeqCst);
            if inner
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
            {
                inner.renew();
            }
        }
    }

    /// The database could not be reached: trust nothing remembered until a
    /// connection has shown where its history stands.
    pub fn distrust(&self) {
        if let Some(inner) = &self.inner {
            inner.trusted_until.store(0, Ordering::SeqCst);
        }
    }

    /// Records what a new connection saw. Returns how history changed, if
    /// it did (the epoch has then moved on); logged and counted by the
    /// caller, once per change.
    pub fn observe(&self, now: Identity) -> Option<String> {
        let inner = self.inner.as_ref()?;
        let mut seen = inner.seen.lock().unwrap_or_else(|e| e.into_inner());
        let change = seen.as_ref().and_then(|before| change(before, &now));
        *seen = Some(match (seen.take(), &change) {
            // Keep the furthest WAL position seen on this timeline, and a
            // timeline a standby's connection could not tell.
            (Some(before), None) => Identity {
                timeline: now.timeline.or(before.timeline),
                wal: now.wal.max(before.wal),
                system: now.system,
            },
            _ => now,
        });
        if change.is_some() {
            inner.epoch.fetch_add(1, Ordering::SeqCst);
        }
        inner.renew();
        change
    }
}

/// How history changed from `before` to `now`, if it did.
fn change(before: &Identity, now: &Identity) -> Option<String> {
    if before.system != now.system {
        return Some(format!(
            "system identifier {} is now {}",
            before.system, now.system
        ));
    }
    match (before.timeline, now.timeline) {
        (Some(was), Some(is)) if was != is => {
            return Some(format!("timeline {was} is now {is}"));
        }
        _ => {}
    }
    match (before.wal, now.wal) {
        (Some(was), Some(is)) if is < was => Some(format!(
            "the WAL position went back from {was} to {is} bytes on timeline {}",
            now.timeline.unwrap_or_default()
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(system: &str, timeline: Option<i64>, wal: Option<i64>) -> Identity {
        Identity {
            system: system.into(),
            timeline,
            wal,
        }
    }

    #[test]
    fn a_new_timeline_another_system_or_a_wal_position_gone_back_is_a_change() {
        let history = DatabaseHistory::tracked();
        assert!(!history.is_trusted(), "nothing seen yet");
        assert_eq!(history.observe(at("7", Some(1), Some(100))), None);
        assert!(history.is_trusted());
        // Further on the same timeline, and a standby's connection: none.
        assert_eq!(history.observe(at("7", Some(1), Some(500))), None);
        assert_eq!(history.observe(at("7", None, None)), None);
        assert_eq!(history.epoch(), 0);

        // Behind the furthest position seen (500), on the same timeline.
        let back = history.observe(at("7", Some(1), Some(400)));
        assert!(back.is_some_and(|c| c.contains("went back")));
        assert_eq!(history.epoch(), 1);

        let promoted = history.observe(at("7", Some(2), Some(450)));
        assert_eq!(promoted.as_deref(), Some("timeline 1 is now 2"));
        assert_eq!(history.epoch(), 2);
        // Once seen, the new history is no change any more.
        assert_eq!(history.observe(at("7", Some(2), Some(460))), None);

        let other = history.observe(at("9", Some(1), Some(10)));
        assert!(other.is_some_and(|c| c.contains("system identifier 7 is now 9")));
        assert_eq!(history.epoch(), 3);
    }

    #[test]
    fn a_lost_database_is_not_trusted_until_a_connection_reports() {
        let history = DatabaseHistory::tracked();
        history.observe(at("7", Some(1), Some(100)));
        history.distrust();
        assert!(!history.is_trusted());
        assert_eq!(history.observe(at("7", Some(1), Some(120))), None);
        assert!(history.is_trusted());
        assert_eq!(history.epoch(), 0);
    }

    #[test]
    fn trust_lasts_as_long_as_it_is_renewed() {
        let history = DatabaseHistory::tracked();
        history.confirm(Duration::from_secs(60));
        assert!(!history.is_trusted(), "no connection has reported yet");
        history.observe(at("7", Some(1), Some(100)));
        assert!(history.is_trusted());

        // Renewals that last next to nothing: a paused process, a check
        // that stopped answering.
        history.confirm(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!history.is_trusted(), "not renewed in time");
        history.confirm(Duration::from_secs(60));
        assert!(history.is_trusted());
    }

    #[test]
    fn an_untracked_history_is_always_trusted() {
        let history = DatabaseHistory::untracked();
        history.distrust();
        assert!(history.is_trusted());
        assert_eq!(history.observe(at("7", Some(1), Some(1))), None);
        assert_eq!(history.epoch(), 0);
    }
}
