//! What the stores take and give for idempotency records: a claim of a
//! key with its new task, what it came to, and a live record as read.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The result of looking a key up.
#[derive(Debug, Clone)]
pub struct KeyLookup {
    /// The key's record, if one exists and is younger than the retention.
    pub record: Option<StoredKey>,
    /// The database's clock at the time of the lookup.
    pub now: DateTime<Utc>,
}

/// A live idempotency record.
#[derive(Debug, Clone)]
pub struct StoredKey {
    /// The fingerprint of the request that claimed the key.
    pub fingerprint: Vec<u8>,
    /// The encoded response given to that request.
    pub response: Vec<u8>,
    /// How long the record stays live, as of the read.
    pub remaining: Duration,
}

impl StoredKey {
    /// The live record a row shows, from its nullable columns: none when
    /// the row holds no record; a remaining time past due counts as zero.
    pub(crate) fn from_columns(
        fingerprint: Option<Vec<u8>>,
        response: Option<Vec<u8>>,
        remaining_us: Option<i64>,
    ) -> Option<Self> {
        fingerprint
            .zip(response)
            .map(|(fingerprint, response)| Self {
                fingerprint,
                response,
                remaining: Duration::from_micros(remaining_us.unwrap_or(0).max(0).unsigned_abs()),
            })
    }
}

/// Everything needed to claim a key and create its task in one go, owned
/// so that it can wait for its batch.
#[derive(Debug, Clone)]
pub struct KeyClaim {
    /// The key's scope: the RPC method, keyed or keyless.
    pub scope: &'static str,
    /// The client's key, or a keyless request's fingerprint in hex, after
    /// the agent's id (`"@<agent_id> <key>"`).
    pub key: String,
    /// The same record's keys in the earlier, per-API-key scope, to write
    /// too in the same transaction, so that instances of the earlier
    /// version see it (a rolling upgrade). If a live record of the same
    /// agent's task holds one, the claim comes to that record, and nothing
    /// of this one is kept; one held by another agent's task is left to
    /// it. PostgreSQL only: SQLite serves one process, so no earlier
    /// version runs beside it.
    pub twins: Vec<String>,
    /// The request's fingerprint (SHA-256).
    pub fingerprint: [u8; 32],
    /// The new task's id.
    pub task_id: Uuid,
    /// The new task's agent.
    pub agent_id: String,
    /// The new task's action.
    pub action: String,
    /// The new task's parameters as canonical JSON.
    pub parameters_json: String,
    /// The new task's creation time, as its response says.
    pub create_time: DateTime<Utc>,
    /// The encoded response to store for replays.
    pub response: Vec<u8>,
    /// Records older than this count as absent and may be replaced.
    pub retention: Duration,
}

/// What a claim came to.
#[derive(Debug, Clone)]
pub enum Claimed {
    /// The key and the new queued task were committed together.
    Created,
    /// A live record holds the key; nothing was written.
    Held(StoredKey),
    /// A record committed while the claim waited holds the key, but the
    /// claim's statement could not read it: read it with
    /// [`Store::find_key`](super::Store::find_key).
    Unseen,
}

impl Claimed {
    /// What a request with the same key, claimed in the same batch right
    /// after `claim`, comes to.
    pub fn for_duplicate_of(&self, claim: &KeyClaim) -> Self {
        match self {
            Self::Created => Self::Held(StoredKey {
                fingerprint: claim.fingerprint.to_vec(),
                response: claim.response.clone(),
                remaining: claim.retention,
            }),
            other => other.clone(),
        }
    }
}
