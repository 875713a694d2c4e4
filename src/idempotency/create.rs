//! The decision for an idempotent CreateTask: create, replay or refuse.
//!
//! 1. The replay cache: a live record cached on this instance answers at
//!    once, without the database: the stored response when the
//!    fingerprints match (a replay), a refusal when they differ.
//! 2. Otherwise one atomic claim, in one round trip (and committed with
//!    the claims that arrived with it): it takes the key and inserts the
//!    task together, or, when a live record holds the key, reads that
//!    record, which answers as in 1. If a concurrent request claimed the
//!    key first, the claim waits for that request's outcome; should the
//!    claim's statement not see the record committed meanwhile, one read
//!    fetches it.

use chrono::{DateTime, SubsecRound, Utc};
use prost::Message;
use uuid::Uuid;

use super::{
    cache::ReplayCache,
    fingerprint::Fingerprint,
    policy::{CREATE_TASK_SCOPE, KEYLESS_CREATE_TASK_SCOPE, KeyPolicy, KeySource},
};
use crate::{
    domain::NewTask,
    proto::tasks_v1::Task,
    storage::{Claimed, KeyClaim, StorageError, Store, StoredKey},
};

/// How often a request re-reads after losing a claim race before it reports
/// contention. Losing twice in a row needs cleanup deleting the winner's
/// record between two statements.
const MAX_CLAIM_ATTEMPTS: usize = 3;

/// What an idempotent create came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The key was new: this task was created and its response stored.
    Created(Task),
    /// The key was used before with the same request: the stored response,
    /// as stored.
    Replayed(Vec<u8>),
    /// The key was used before with a different request.
    Mismatch,
    /// Another request with the key was still in flight after the wait
    /// bound, or the key kept changing hands; the caller should retry shortly.
    InFlight,
}

/// The record a create claims: its scope and key, the request's
/// fingerprint, and how long the record answers.
#[derive(Debug, Clone)]
pub struct ClaimTarget {
    scope: &'static str,
    key: String,
    /// The client's key, or the fingerprint in hex: the part of `key` after
    /// the agent, from which the earlier version's keys are made.
    bare: String,
    fingerprint: Fingerprint,
    retention: std::time::Duration,
}

/// Where records of the earlier version, scoped by API key, may hold a
/// request (see [`LegacyScope`](super::LegacyScope)).
#[derive(Debug, Clone, Copy)]
pub struct Legacy<'a> {
    /// Whether such records may still be live: none is read otherwise.
    pub live: bool,
    /// The names of the API keys (revoked ones too) that act for the
    /// request's agent: the records any of them wrote count.
    pub owners: &'a [String],
    /// In [`LegacyScope::Dual`](super::LegacyScope::Dual), the names to
    /// write the request's record under too, so that an instance of the
    /// earlier version finds it whichever of them the retry comes with:
    /// the agent keys acting for the agent and the calling key (`None`
    /// stands for the bare key of an unauthenticated call). Empty
    /// otherwise.
    pub twins: &'a [Option<String>],
}

impl Legacy<'_> {
    /// No earlier records to read or write.
    pub const NONE: Legacy<'static> = Legacy {
        live: false,
        owners: &[],
        twins: &[],
    };
}

impl ClaimTarget {
    /// The record for `task` sent with `source`: the client's key within
    /// the retention, or (keyless) the fingerprint within the dedup window,
    /// scoped by the agent the task is for.
    ///
    /// Every caller allowed to act for an agent shares its records, so a
    /// retry with a rotated or another API key of the agent replays, and
    /// two agents never share one. The stored key is `"@<agent_id> <key>"`:
    /// keys have no space, so the agent is all before the last one, and no
    /// record of the earlier, per-API-key scope (`"<key name> <key>"`, key
    /// names never start with `@`; or the bare key, which has no space)
    /// can be mistaken for one.
    pub fn new(source: KeySource<'_>, task: &NewTask, policy: &KeyPolicy) -> Self {
        let fingerprint = Fingerprint::of_new_task(CREATE_TASK_SCOPE, task);
        let (scope, bare, retention) = match source {
            KeySource::Header(key) => {
                (CREATE_TASK_SCOPE, key.as_str().to_owned(), policy.retention)
            }
            KeySource::Fingerprint => (
                KEYLESS_CREATE_TASK_SCOPE,
                fingerprint.to_hex(),
                policy.dedup_window,
            ),
        };
        Self {
            scope,
            key: format!("@{} {bare}", task.agent_id),
            bare,
            fingerprint,
            retention,
        }
    }

    /// The keys the earlier version stored this request's record under,
    /// had one of `owners` (or, bare, an unauthenticated caller) sent it.
    pub fn legacy_keys(&self, owners: &[String]) -> Vec<String> {
        owners
            .iter()
            .map(|owner| legacy_key(Some(owner), &self.bare))
            .chain(std::iter::once(self.bare.clone()))
            .collect()
    }

    /// How a live record answers this request.
    fn answer(&self, stored: StoredKey) -> Outcome {
        if stored.fingerprint == self.fingerprint.as_bytes() {
            Outcome::Replayed(stored.response)
        } else {
            Outcome::Mismatch
        }
    }

    /// The claim of this record for `creation`, ready for the store;
    /// `twins`: see [`Legacy::twins`].
    pub fn claim(&self, task: &NewTask, creation: &Creation, twins: &[Option<String>]) -> KeyClaim {
        KeyClaim {
            scope: self.scope,
            key: self.key.clone(),
            twins: twins
                .iter()
                .map(|owner| legacy_key(owner.as_deref(), &self.bare))
                .collect(),
            fingerprint: self.fingerprint.0,
            task_id: creation.task_id,
            agent_id: task.agent_id.clone(),
            action: task.action.clone(),
            parameters_json: task.parameters_json.clone(),
            create_time: creation.create_time,
            response: creation.encoded.clone(),
            retention: self.retention,
        }
    }

    /// The record a claim of this target for `creation` wrote.
    fn record_of(&self, creation: &Creation) -> StoredKey {
        StoredKey {
            fingerprint: self.fingerprint.0.to_vec(),
            response: creation.encoded.clone(),
            remaining: self.retention,
        }
    }
}

/// The key the earlier version stored a record under: `"<owner> <key>"`,
/// or the bare key without an owner.
fn legacy_key(owner: Option<&str>, bare: &str) -> String {
    match owner {
        Some(owner) => format!("{owner} {bare}"),
        None => bare.to_owned(),
    }
}

/// A task about to be created, and the response that creating it gives.
#[derive(Debug, Clone)]
pub struct Creation {
    task_id: Uuid,
    create_time: DateTime<Utc>,
    response: Task,
    encoded: Vec<u8>,
}

impl Creation {
    /// A new queued task for `task`, created at `now`.
    ///
    /// Its id is a UUID v7 (RFC 9562: milliseconds since the epoch, then 74
    /// random bits): ids made one after another sort together, so a new
    /// task's id lands on the last page of each index of task ids (two per
    /// create on SQLite, tasks' and key records'), not on a random one that
    /// must be read and written back whole.
    pub fn new(task: &NewTask, now: DateTime<Utc>) -> Self {
        let task_id = Uuid::now_v7();
        let response = task.to_queued_task(task_id, now);
        let encoded = response.encode_to_vec();
        Self {
            task_id,
            create_time: now,
            response,
            encoded,
        }
    }

    /// The response the first request gets, and every replay as stored.
    pub fn response(&self) -> &Task {
        &self.response
    }
}

/// Creates the task for `source` exactly once, or answers as the first
/// request with that key (or, keyless, that fingerprint within the window)
/// was answered.
///
/// A live record of the earlier, per-API-key scope that holds the request
/// (see `legacy`) answers as the agent-scoped record would.
pub async fn create_task<S: Store>(
    store: &S,
    replays: &ReplayCache,
    source: KeySource<'_>,
    task: &NewTask,
    policy: &KeyPolicy,
    legacy: Legacy<'_>,
) -> Result<Outcome, StorageError> {
    let target = ClaimTarget::new(source, task, policy);
    if let Some(stored) = replays.get(target.scope, &target.key) {
        return Ok(target.answer(stored));
    }
    if legacy.live {
        let sent = replays.sent();
        let keys = target.legacy_keys(legacy.owners);
        if let Some(stored) = store
            .find_legacy_key(target.scope, &keys, &task.agent_id, target.retention)
            .await?
        {
            replays.insert(target.scope, &target.key, &stored, sent);
            return Ok(target.answer(stored));
        }
    }
    for _ in 0..MAX_CLAIM_ATTEMPTS {
        // The stores keep microseconds; the response says what they keep.
        let creation = Creation::new(task, Utc::now().trunc_subsecs(6));
        let sent = replays.sent();
        let claim = target.claim(task, &creation, legacy.twins);
        let stored = match store.claim_key(claim).await {
            Ok(Claimed::Created) => {
                replays.insert(
                    target.scope,
                    &target.key,
                    &target.record_of(&creation),
                    sent,
                );
                return Ok(Outcome::Created(creation.response));
            }
            Ok(Claimed::Held(stored)) if !stored.remaining.is_zero() => stored,
            // A record that has expired answers nothing: read again.
            Ok(Claimed::Held(_) | Claimed::Unseen) => {
                let sent = replays.sent();
                let lookup = store
                    .find_key(target.scope, &target.key, target.retention)
                    .await?;
                match lookup.record {
                    Some(stored) => {
                        replays.insert(target.scope, &target.key, &stored, sent);
                        return Ok(target.answer(stored));
                    }
                    // Expired, or deleted, between the two statements.
                    None => continue,
                }
            }
            // The claim waited the whole bound for a concurrent request
            // holding this key (on SQLite: for a write lock held elsewhere,
            // which may be such a request). A wait for anything else, a
            // table lock or a congested SQLite writer, is the database
            // being busy: an error, UNAVAILABLE.
            Err(StorageError::LockTimeout(_) | StorageError::WriteLocked(_)) => {
                return Ok(Outcome::InFlight);
            }
            Err(error) => return Err(error),
        };
        replays.insert(target.scope, &target.key, &stored, sent);
        return Ok(target.answer(stored));
    }
    Ok(Outcome::InFlight)
}
