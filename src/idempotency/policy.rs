//! Which records answer a request, and for how long.

use std::time::Duration;

use super::key::IdempotencyKey;

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

/// In a keyless CreateTask's extensions: the caller asked, with
/// `idempotency-fallback: fingerprint`, to be deduplicated by fingerprint
/// whatever the [`MissingKeyPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FingerprintAsked;

/// What to do with records written before keys were scoped by agent,
/// which were scoped by the API key that wrote them (`"<key name> <key>"`,
/// or the bare key without authentication).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LegacyScope {
    /// Honour them while any may be live (the retention after the last was
    /// written); write agent-scoped records only. The default.
    #[default]
    Read,
    /// Honour them, and write each record also under the calling key's
    /// name, so that instances of an earlier version running beside this
    /// one (a rolling upgrade) see it too. PostgreSQL only.
    Dual,
    /// Ignore them.
    Off,
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
    /// What records of the earlier, per-API-key scope count for.
    pub legacy: LegacyScope,
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
