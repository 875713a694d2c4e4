//! The values every layer shares, parsed once: a request that reaches the
//! storage layer has passed every rule, so storage cannot be handed
//! unvalidated input. Nothing here does I/O.
//!
//! - [`task`]: a validated CreateTask request ([`NewTask`]) and a stored task
//!   ([`TaskRecord`]), and their protobuf form.
//! - [`parameters`]: `parameters` as JSON, refusing what has no JSON form.
//! - [`requests`]: the arguments of GetTask, ListTasks, WaitTask and
//!   Cleanup, parsed.
//! - [`worker`]: the arguments of the WorkerService calls, parsed.
//! - [`lease`]: which leasable tasks a lease statement takes (the cut),
//!   decided once for both stores.
//! - [`status`]: a task's status as stored ([`StoredStatus`]): its number,
//!   its name, whether it is final.
//! - [`principal`]: who calls: an API key's name, role and scope.
//! - [`violation`]: what a refusal says about a field, and how much of the
//!   caller's input it may echo.
//! - [`canonical_json`]: the canonical form (RFC 8785) that is stored and
//!   fingerprinted.

pub mod canonical_json;
pub mod lease;
pub mod parameters;
pub mod principal;
pub mod requests;
pub mod status;
pub mod task;
pub mod violation;
pub mod worker;

pub use parameters::{Limits, MAX_PARAMETERS_DEPTH};
pub use principal::{ApiKeyRecord, PreviousToken, Principal, Role};
pub use requests::{CleanupQuery, ListQuery, PageToken, TaskId, WaitQuery};
pub use status::StoredStatus;
pub use task::{MAX_NAME_BYTES, NewTask, TaskRecord, timestamp};
pub use violation::{FieldViolation, echo};
pub use worker::{Completion, Failure, LeaseQuery, LeaseRef, MAX_LEASED_BYTES, Renewal};
