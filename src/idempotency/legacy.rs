//! Records of the earlier, per-API-key scope: whether any may still be live.
//!
//! Until this version, a record was scoped by the API key that wrote it
//! (`"<key name> <key>"`, or the bare key without authentication). Those
//! records keep answering their retries until they expire, on every
//! instance, whatever key of the agent the retry comes with. The database
//! keeps when the last of them may have been written (`upgrade_marks`,
//! set by the migration when records existed, and kept current by every
//! instance writing them in [`LegacyScope::Dual`]); an instance reads them
//! only while one written then could still be live, so a deployment that
//! upgraded a day ago, or never had an earlier version, pays nothing.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use tokio::task::JoinHandle;

use super::policy::{KeyPolicy, LegacyScope};
use crate::storage::{StorageError, Store};

/// How often the mark is read again (and, in [`LegacyScope::Dual`],
/// written again).
const REFRESH: Duration = Duration::from_secs(30);
/// Added to the mark for records written between two refreshes, and for
/// the instances' clocks, which the mark is compared with.
const SLACK: Duration = Duration::from_secs(120);

/// Whether records of the earlier scope may be live now; cheap to clone.
#[derive(Debug, Clone)]
pub struct LegacyRecords {
    scope: LegacyScope,
    live: Arc<AtomicBool>,
}

impl LegacyRecords {
    /// Reads the mark from `store` (in [`LegacyScope::Dual`], writes it
    /// first: this instance is about to write such records).
    pub async fn load<S: Store>(store: &S, policy: &KeyPolicy) -> Result<Self, StorageError> {
        let records = Self {
            scope: policy.legacy,
            live: Arc::new(AtomicBool::new(policy.legacy == LegacyScope::Dual)),
        };
        records.refresh_once(store, policy).await?;
        Ok(records)
    }

    /// Never live: for servers and tests with no earlier records.
    pub fn none() -> Self {
        Self {
            scope: LegacyScope::Off,
            live: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether a create should look for such records.
    pub fn live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether a create should write its record in the earlier scope too.
    pub fn dual(&self) -> bool {
        self.scope == LegacyScope::Dual
    }

    /// Reads (and in [`LegacyScope::Dual`] writes) the mark every 30 s,
    /// until the handle is aborted; a failure keeps what was known.
    pub fn refresh<S: Store>(&self, store: S, policy: KeyPolicy) -> Option<JoinHandle<()>> {
        if self.scope == LegacyScope::Off {
            return None;
        }
        let records = self.clone();
        Some(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(REFRESH);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                if let Err(error) = records.refresh_once(&store, &policy).await {
                    tracing::warn!(error = %crate::telemetry::chain(&error), "cannot read when records of the earlier key scope were last written");
                }
            }
        }))
    }

    async fn refresh_once<S: Store>(
        &self,
        store: &S,
        policy: &KeyPolicy,
    ) -> Result<(), StorageError> {
        let live = match self.scope {
            LegacyScope::Off => false,
            LegacyScope::Dual => {
                store.mark_legacy_key_records().await?;
                true
            }
            LegacyScope::Read => {
                let longest = policy.retention.max(policy.dedup_window) + REFRESH + SLACK;
                match store.legacy_key_records_at().await? {
                    Some(at) => chrono::Duration::from_std(longest)
                        .ok()
                        .and_then(|longest| at.checked_add_signed(longest))
                        .is_none_or(|until| Utc::now() < until),
                    None => false,
                }
            }
        };
        if self.live.swap(live, Ordering::Relaxed) != live {
            if live {
                tracing::info!(
                    "records of the earlier, per-API-key scope may be live: creates look for them too"
                );
            } else {
                tracing::info!("no record of the earlier, per-API-key scope can be live any more");
            }
        }
        Ok(())
    }
}
