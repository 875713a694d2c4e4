//! oncely: a gRPC service that makes agents' side effects happen exactly once.
//!
//! An agent calls `tasks.v1.TaskService/CreateTask` with an `idempotency-key`;
//! one key yields exactly one task, and every retry gets the first response
//! back byte for byte. The crate is laid out by layer, each importing only
//! from the layers below it:
//!
//! - [`api`]: the gRPC surface: the services, the layer that validates the
//!   `idempotency-key` metadata, the one mapping from errors to `Status`, and
//!   the one place an RPC's outcome is logged and its metadata attached.
//! - [`idempotency`]: the key newtype, the fingerprint, and the create /
//!   replay / refuse decision (`create.rs`).
//! - [`queue`]: the task lifecycle after creation: leases, completion,
//!   failure, cancellation, and waiting for a result.
//! - [`auth`]: API keys and the key ring calls are checked against.
//! - [`storage`]: every SQL statement, behind the [`storage::Store`] trait,
//!   for PostgreSQL and for the embedded SQLite store.
//! - [`domain`]: validated requests and stored tasks, shared by the layers
//!   above; no I/O.
//! - [`proto`]: the API's types, shared with the `oncely-client` crate, and
//!   [`codec`], the wire codec of the server's stubs.
//!
//! Around them: [`config`] (flags and environment), [`startup`] (wiring and
//! serving), [`health`] (database-backed health), [`cleanup_cmd`] (the
//! `cleanup` subcommand for cron), [`api_keys_cmd`] (the `keys` subcommand for
//! API keys) and [`telemetry`] (logs). The retrying
//! client for agents is the separate `oncely-client` crate.
#![forbid(unsafe_code)]

pub mod api;
pub mod api_keys_cmd;
pub mod auth;
pub mod cleanup_cmd;
pub mod codec;
pub mod config;
pub mod domain;
pub mod health;
pub mod idempotency;
pub mod metrics;
pub mod ops_http;
pub mod proto;
pub mod queue;
pub mod startup;
pub mod storage;
pub mod telemetry;

pub use config::Settings;
pub use startup::{run, serve};
