//! What the workload saw: every call it made and every answer it got, kept
//! in memory for the checker. Nothing here judges; `checker` does.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use oncely_client::proto::tasks_v1::{CreateTaskRequest, Task};
use tonic::Code;
use uuid::Uuid;

/// What a create is deduplicated by: a key sent in the metadata, or, for a
/// keyless call, its own content (named by the `fingerprint` member every
/// such request carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum KeyRef {
    Keyed(Uuid),
    Keyless(Uuid),
}

impl KeyRef {
    /// The parameters member that names the key in the request.
    pub(crate) fn member(self) -> (&'static str, Uuid) {
        match self {
            KeyRef::Keyed(id) => ("key", id),
            KeyRef::Keyless(id) => ("fingerprint", id),
        }
    }
}

/// How a call ended, as the caller sees it.
#[derive(Debug, Clone)]
pub(crate) enum Answer<T> {
    /// The server answered OK.
    Ok(T),
    /// The server refused, for good (retrying would not help).
    Refused(Code, String),
    /// Unknown: a deadline, UNAVAILABLE, a broken connection, a cancel.
    /// The call may or may not have taken effect.
    Unknown(String),
}

/// One CreateTask attempt.
#[derive(Debug, Clone)]
pub(crate) struct CreateAttempt {
    pub(crate) key: KeyRef,
    /// A different request sent with a key already acknowledged, which the
    /// server must refuse.
    pub(crate) variant: bool,
    pub(crate) answer: Answer<Created>,
    /// When the attempt was sent, and when its answer came back.
    pub(crate) sent: Instant,
    pub(crate) received: Instant,
}

/// An OK CreateTask answer.
#[derive(Debug, Clone)]
pub(crate) struct Created {
    pub(crate) task: Task,
    pub(crate) replayed: bool,
}

/// A lease granted to a worker, with the server's clock readings.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub(crate) task_id: String,
    pub(crate) token: String,
    pub(crate) attempt: i32,
    /// When it was granted (the task's update time), in microseconds.
    pub(crate) granted_us: i128,
    /// When it runs out, in microseconds.
    pub(crate) expires_us: i128,
}

/// One CompleteTask attempt.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub(crate) task_id: String,
    pub(crate) token: String,
    pub(crate) result: serde_json::Value,
    pub(crate) answer: Answer<Task>,
}

/// Everything the workload recorded.
#[derive(Debug, Default)]
pub(crate) struct History {
    /// The one request each key stands for (a variant differs from it).
    pub(crate) requests: Mutex<HashMap<KeyRef, CreateTaskRequest>>,
    pub(crate) creates: Mutex<Vec<CreateAttempt>>,
    pub(crate) grants: Mutex<Vec<Grant>>,
    /// Lease token and new expiry, in microseconds, of each OK RenewLease.
    pub(crate) renewals: Mutex<Vec<(String, i128)>>,
    pub(crate) completions: Mutex<Vec<Completion>>,
    /// Tokens a FailTask was sent with, whatever its answer.
    pub(crate) fails: Mutex<Vec<String>>,
    /// The messages of INTERNAL answers the server sent.
    pub(crate) internal: Mutex<Vec<String>>,
    pub(crate) counts: Counts,
}

/// Operation counters, read while the run goes on.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Logical creates: one per intent, however many attempts it took.
    pub(crate) creates: AtomicU64,
    pub(crate) create_attempts: AtomicU64,
    /// Creates that ended with an OK answer.
    pub(crate) acknowledged: AtomicU64,
    /// Creates given up with their outcome unknown (the key's time ran out).
    pub(crate) abandoned: AtomicU64,
    pub(crate) keyless: AtomicU64,
    pub(crate) variants: AtomicU64,
    pub(crate) lease_calls: AtomicU64,
    pub(crate) leases: AtomicU64,
    pub(crate) completes: AtomicU64,
    pub(crate) fails: AtomicU64,
    pub(crate) renews: AtomicU64,
    /// Leases a worker walked away from, as if it had died.
    pub(crate) deaths: AtomicU64,
    /// Leases a worker held past their end before completing.
    pub(crate) stalls: AtomicU64,
    /// Calls a client cancelled while they were in flight.
    pub(crate) client_cancels: AtomicU64,
}

impl Counts {
    /// Every operation: logical creates and every worker call.
    pub(crate) fn operations(&self) -> u64 {
        [
            &self.creates,
            &self.lease_calls,
            &self.completes,
            &self.fails,
            &self.renews,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Adds one to `counter`.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A task's row as the database holds it at the end.
#[derive(Debug, Clone)]
pub(crate) struct TaskRow {
    pub(crate) task_id: String,
    pub(crate) agent_id: String,
    pub(crate) action: String,
    pub(crate) parameters: serde_json::Value,
    pub(crate) status: i64,
    pub(crate) result: Option<serde_json::Value>,
    pub(crate) attempt: i64,
}

/// A protobuf timestamp in microseconds.
pub(crate) fn micros(ts: Option<&prost_types::Timestamp>) -> i128 {
    ts.map(|t| i128::from(t.seconds) * 1_000_000 + i128::from(t.nanos) / 1_000)
        .unwrap_or(0)
}
