//! The idempotency domain: which record answers a request, and the decision
//! between creating, replaying and refusing.
//!
//! - [`key`]: the `idempotency-key` newtype, parsed once.
//! - [`fingerprint`]: SHA-256 of a request's canonical JSON, "same request
//!   or not".
//! - [`policy`]: scopes, retention, and what a missing key means.
//! - [`cache`]: live records kept in memory, so replays skip the database.
//! - [`legacy`]: whether records of the earlier, per-API-key scope may be
//!   live.
//! - [`create`]: the create / replay / refuse decision.

pub mod cache;
pub mod create;
pub mod fingerprint;
pub mod key;
pub mod legacy;
pub mod policy;

pub use cache::ReplayCache;
pub use create::{ClaimTarget, Creation, Legacy, Outcome, create_task};
pub use fingerprint::Fingerprint;
pub use key::{IdempotencyKey, IdempotencyKeyError, MAX_KEY_LEN};
pub use legacy::LegacyRecords;
pub use policy::{
    CREATE_TASK_SCOPE, FingerprintAsked, KEYLESS_CREATE_TASK_SCOPE, KeyPolicy, KeySource,
    LegacyScope, MissingKeyPolicy,
};
