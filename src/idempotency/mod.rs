//! The idempotency domain: keys, fingerprints, and the decision between
//! creating, replaying and refusing.
//!
//! The flow for a keyed CreateTask:
//! 1. One indexed read of the key (and the database clock). A live record
//!    answers at once: the stored response when the fingerprints match (a
//!    replay, no write), a refusal when they differ.
//! 2. Otherwise one statement claims the key and inserts the task together.
//!    If a concurrent request claimed the key first, the statement waits for
//!    that request's outcome and writes nothing; the read is then repeated
//!    and answers as a retry would.

pub mod canonical_json;
mod fingerprint;
mod key;

use std::time::Duration;

use prost::Message;
use uuid::Uuid;

pub use fingerprint::Fingerprint;
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN};

use crate::{
    domain::{NewTask, json_to_struct},
    proto::tasks_v1::{Task, TaskStatus},
    storage::{ClaimOutcome, NewKeyedTask, StorageError, Store},
};

/// The scope of keys sent to CreateTask: its full gRPC method name.
pub const CREATE_TASK_SCOPE: &str = "tasks.v1.TaskService/CreateTask";

/// The scope of records for keyless CreateTask calls deduplicated by
/// fingerprint. A scope of its own, so keyed and keyless records never
/// answer for each other.
pub const KEYLESS_CREATE_TASK_SCOPE: &str = "tasks.v1.TaskService/CreateTask#fingerprint";

/// What to do with a CreateTask that carries no `idempotency-key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MissingKeyPolicy {
    /// Refuse it with INVALID_ARGUMENT (the default).
    #[default]
    Reject,
    /// Deduplicate it against identical requests within the dedup window.
    Fingerprint,
}

/// How long records answer for retries, and what a missing key means.
#[derive(Debug, Clone, Copy)]
pub struct KeyPolicy {
    /// Keyed records older than this are treated as absent.
    pub retention: Duration,
    /// What to do without a key.
    pub missing_key: MissingKeyPolicy,
    /// Keyless records older than this are treated as absent.
    pub dedup_window: Duration,
}

/// Where the record that answers a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource<'a> {
    /// The client's `idempotency-key`.
    Header(&'a IdempotencyKey),
    /// No key: the request's own fingerprint, within the dedup window.
    Fingerprint,
}

impl KeySource<'_> {
    /// The value of the `idempotency-key-source` response metadata.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeySource::Header(_) => "header",
            KeySource::Fingerprint => "fingerprint",
        }
    }
}

/// How often a request re-reads after losing a claim race before it reports
/// contention. Losing twice in a row needs cleanup deleting the winner's
/// record between two statements.
const MAX_CLAIM_ATTEMPTS: usize = 3;

/// What an idempotent create came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The key was new: this task was created and its response stored.
    Created(Task),
    /// The key was used before with the same request: the stored response.
    Replayed(Vec<u8>),
    /// The key was used before with a different request.
    Mismatch,
    /// Another request with the key was still in flight after the wait
    /// bound, or the key kept changing hands; the caller should retry shortly.
    InFlight,
}

/// Creates the task for `source` exactly once, or answers as the first
/// request with that key (or, keyless, that fingerprint within the window)
/// was answered.
pub async fn create_task<S: Store>(
    store: &S,
    source: KeySource<'_>,
    task: &NewTask,
    policy: &KeyPolicy,
) -> Result<Outcome, StorageError> {
    let fingerprint = Fingerprint::of_new_task(CREATE_TASK_SCOPE, task);
    let hex_fingerprint;
    let (scope, key, retention) = match source {
        KeySource::Header(key) => (CREATE_TASK_SCOPE, key.as_str(), policy.retention),
        KeySource::Fingerprint => {
            hex_fingerprint = fingerprint.to_hex();
            (
                KEYLESS_CREATE_TASK_SCOPE,
                hex_fingerprint.as_str(),
                policy.dedup_window,
            )
        }
    };
    for _ in 0..MAX_CLAIM_ATTEMPTS {
        let lookup = store.find_key(scope, key, retention).await?;
        if let Some(stored) = lookup.record {
            return Ok(if stored.fingerprint == fingerprint.as_bytes() {
                Outcome::Replayed(stored.response)
            } else {
                Outcome::Mismatch
            });
        }

        let task_id = Uuid::new_v4();
        let response = Task {
            task_id: task_id.to_string(),
            agent_id: task.agent_id.clone(),
            action: task.action.clone(),
            parameters: Some(json_to_struct(&task.parameters)),
            status: TaskStatus::Queued as i32,
            create_time: Some(crate::api::timestamp(lookup.now)),
            result: None,
        };
        let encoded = response.encode_to_vec();
        let claim = NewKeyedTask {
            scope,
            key,
            fingerprint: &fingerprint,
            task,
            task_id,
            status: TaskStatus::Queued as i16,
            create_time: lookup.now,
            response: &encoded,
            retention,
        };
        match store.claim_key_and_insert_task(&claim).await {
            Ok(ClaimOutcome::Claimed) => return Ok(Outcome::Created(response)),
            Ok(ClaimOutcome::AlreadyClaimed) => continue,
            // The claim waited the whole bound for a concurrent request
            // holding this key.
            Err(StorageError::LockTimeout(_) | StorageError::WriterBusy(_)) => {
                return Ok(Outcome::InFlight);
            }
            Err(error) => return Err(error),
        }
    }
    Ok(Outcome::InFlight)
}
