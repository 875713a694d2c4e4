//! A bounded in-process cache of committed key records, so that a replay
//! (and a refusal of a reused key) is answered without the database.
//!
//! A record never changes while it is live: it is written once, and only
//! replaced after it expires. So any instance may keep a copy, as long as
//! the copy expires no later than the record. Each entry expires at the
//! instant measured *before* the statement that read or wrote the record
//! was sent, plus the time the database said the record had left: never
//! later than the database's own expiry. An expired record is never
//! replayed from here; the request goes to the database, which replaces the
//! record if it expired there too, so a key reused after expiry executes
//! afresh. Cleanup deletes only expired records, which the cache has
//! already dropped.
//!
//! The cache holds at most `REPLAY_CACHE_BYTES` of records (keys,
//! fingerprints and responses), evicting the least useful first.
//!
//! All of this holds while the database keeps its history. A failover to a
//! standby that lacked the latest commits (asynchronous replication), or a
//! restore from a backup, takes records away; an entry of such a record
//! would answer a task no database holds. So each entry carries the epoch
//! of the database's history it was read in (see
//! [`DatabaseHistory`]), and answers only in that epoch, and only while the
//! history is trusted (not while the database is out of reach).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use moka::{Expiry, sync::Cache};

use crate::storage::{DatabaseHistory, StoredKey};

/// What each entry costs beyond its key's, fingerprint's and response's
/// bytes, for the capacity: the allocator's headers and rounding of each
/// of them and of the entry, and moka's own bookkeeping (its map, its
/// access and write orders, its timer wheel). Measured: 100,000 entries of
/// 225 bytes each (a keyed create's) took 740 bytes of resident memory
/// each; so that `REPLAY_CACHE_BYTES` bounds the memory it names (96, the
/// figure before, let an 8 MiB cache hold 20 MiB).
const ENTRY_OVERHEAD: usize = 512;

/// A cached record.
#[derive(Debug)]
struct Entry {
    fingerprint: Vec<u8>,
    response: Vec<u8>,
    expires: Instant,
    /// The epoch of the database's history the record was read in.
    epoch: u64,
}

/// When a statement that reads or writes a record was sent, and in which
/// epoch of the database's history: taken before it is sent.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    at: Instant,
    epoch: u64,
    trusted: bool,
}

/// Expires each entry at its own instant.
struct UntilExpiry;

impl Expiry<String, Arc<Entry>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        entry: &Arc<Entry>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.expires.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Arc<Entry>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.expires.saturating_duration_since(updated_at))
    }
}

/// The cache; cloning it shares it. Disabled (every lookup misses) with a
/// capacity of 0.
#[derive(Clone)]
pub struct ReplayCache {
    entries: Option<Cache<String, Arc<Entry>>>,
    history: DatabaseHistory,
}

impl std::fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("entries", &self.entries.as_ref().map(Cache::entry_count))
            .finish()
    }
}

/// The cache's name for a record.
fn name(scope: &str, key: &str) -> String {
    let mut name = String::with_capacity(scope.len() + 1 + key.len());
    name.push_str(scope);
    name.push('\n');
    name.push_str(key);
    name
}

impl ReplayCache {
    /// A cache of at most `max_bytes` of records (0 disables it), valid
    /// while `history` says the database's history is unchanged.
    pub fn new(max_bytes: u64, history: DatabaseHistory) -> Self {
        let entries = (max_bytes > 0).then(|| {
            Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|name: &String, entry: &Arc<Entry>| {
                    let bytes = name.len()
                        + entry.fingerprint.len()
                        + entry.response.len()
                        + ENTRY_OVERHEAD;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .expire_after(UntilExpiry)
                .build()
        });
        Self { entries, history }
    }

    /// Marks a statement about to be sent, for [`insert`](Self::insert).
    pub fn sent(&self) -> Sent {
        Sent {
            at: Instant::now(),
            epoch: self.history.epoch(),
            trusted: self.history.is_trusted(),
        }
    }

    /// The live record of `key` in `scope`, if cached.
    pub fn get(&self, scope: &str, key: &str) -> Option<StoredKey> {
        let found = self.lookup(scope, key);
        let metrics = crate::metrics::metrics();
        match found {
            Some(_) => metrics.cache_hits.inc(),
            None => metrics.cache_misses.inc(),
        };
        found
    }

    fn lookup(&self, scope: &str, key: &str) -> Option<StoredKey> {
        let entries = self.entries.as_ref()?;
        if !self.history.is_trusted() {
            return None;
        }
        let entry = entries.get(&name(scope, key))?;
        if entry.epoch != self.history.epoch() {
            // Read in an earlier history: the database may no longer hold
            // it. (Every entry of that epoch goes the same way.)
            entries.invalidate(&name(scope, key));
            return None;
        }
        let remaining = entry.expires.checked_duration_since(Instant::now())?;
        if remaining.is_zero() {
            return None;
        }
        Some(StoredKey {
            fingerprint: entry.fingerprint.clone(),
            response: entry.response.clone(),
            remaining,
        })
    }

    /// Keeps `record` of `key` in `scope`, as read or written by a
    /// statement marked `sent`; not if the database's history changed (or
    /// was in doubt) since.
    pub fn insert(&self, scope: &str, key: &str, record: &StoredKey, sent: Sent) {
        let Some(entries) = &self.entries else {
            return;
        };
        if !sent.trusted || sent.epoch != self.history.epoch() {
            return;
        }
        let Some(expires) = sent.at.checked_add(record.remaining) else {
            return;
        };
        entries.insert(
            name(scope, key),
            Arc::new(Entry {
                fingerprint: record.fingerprint.clone(),
                response: record.response.clone(),
                expires,
                epoch: sent.epoch,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(remaining: Duration) -> StoredKey {
        StoredKey {
            fingerprint: vec![1; 32],
            response: vec![2; 10],
            remaining,
        }
    }

    #[test]
    fn a_record_is_served_until_its_remaining_time_from_when_it_was_sent() {
        let cache = ReplayCache::new(1 << 20, DatabaseHistory::untracked());
        let sent = cache.sent();
        cache.insert("s", "live", &record(Duration::from_secs(60)), sent);
        cache.insert("s", "gone", &record(Duration::from_millis(1)), sent);
        std::thread::sleep(Duration::from_millis(5));

        let live = cache.get("s", "live").expect("live");
        assert_eq!(live.response, vec![2; 10]);
        assert!(live.remaining <= Duration::from_secs(60));
        assert!(cache.get("s", "gone").is_none(), "expired");
        assert!(cache.get("other", "live").is_none(), "scopes apart");
    }

    fn identity(timeline: i64) -> crate::storage::Identity {
        crate::storage::Identity {
            system: "7".into(),
            timeline: Some(timeline),
            wal: Some(100),
        }
    }

    #[test]
    fn a_record_read_before_the_history_changed_is_never_answered() {
        let history = DatabaseHistory::tracked();
        let cache = ReplayCache::new(1 << 20, history.clone());
        history.observe(identity(1));
        cache.insert("s", "k", &record(Duration::from_secs(60)), cache.sent());
        assert!(cache.get("s", "k").is_some());

        // A failover to a standby: a new timeline.
        let sent_before = cache.sent();
        assert!(history.observe(identity(2)).is_some());
        assert!(cache.get("s", "k").is_none(), "read on the old timeline");
        // Nor is a record whose statement was sent before the change.
        cache.insert("s", "late", &record(Duration::from_secs(60)), sent_before);
        assert!(cache.get("s", "late").is_none());
        // What is read now is answered again.
        cache.insert("s", "k", &record(Duration::from_secs(60)), cache.sent());
        assert!(cache.get("s", "k").is_some());
    }

    #[test]
    fn nothing_is_answered_while_the_database_is_out_of_reach() {
        let history = DatabaseHistory::tracked();
        let cache = ReplayCache::new(1 << 20, history.clone());
        cache.insert("s", "k", &record(Duration::from_secs(60)), cache.sent());
        assert!(
            cache.get("s", "k").is_none(),
            "no connection has reported yet"
        );
        history.observe(identity(1));
        cache.insert("s", "k", &record(Duration::from_secs(60)), cache.sent());
        assert!(cache.get("s", "k").is_some());

        history.distrust();
        assert!(cache.get("s", "k").is_none());
        // Back, on the same history: the entry answers again.
        history.observe(identity(1));
        assert!(cache.get("s", "k").is_some());
    }

    #[test]
    fn a_disabled_cache_misses() {
        let cache = ReplayCache::new(0, DatabaseHistory::untracked());
        cache.insert("s", "k", &record(Duration::from_secs(60)), cache.sent());
        assert!(cache.get("s", "k").is_none());
    }

    #[test]
    fn the_cache_holds_at_most_its_capacity() {
        let cache = ReplayCache::new(64 * 1024, DatabaseHistory::untracked());
        let big = StoredKey {
            fingerprint: vec![1; 32],
            response: vec![2; 1000],
            remaining: Duration::from_secs(60),
        };
        for i in 0..1000 {
            cache.insert("s", &i.to_string(), &big, cache.sent());
        }
        let entries = cache.entries.as_ref().expect("enabled");
        entries.run_pending_tasks();
        assert!(
            entries.weighted_size() <= 64 * 1024,
            "{} bytes",
            entries.weighted_size()
        );
    }
}
