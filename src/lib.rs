//! oncely: a gRPC service that makes agents' side effects happen exactly once.
//!
//! An agent calls `tasks.v1.TaskService/CreateTask` with an `idempotency-key`;
//! one key yields exactly one task, and every retry gets the first response
//! back byte for byte. The crate is laid out by layer, each importing only
//! from the layers below it (`tests/layers.rs` holds that), top down:
//!
//! - [`startup`] (wiring: picks the store, builds the services and the
//!   gates around them, serves until shutdown) and [`config`] (flags and
//!   environment, parsed once).
//! - The surfaces: [`api`] (the gRPC services, the gates every call passes
//!   through in the order `api::stack` writes down, the one mapping from
//!   errors to `Status`, and the JSON API, `api::json`, which turns HTTP
//!   calls into the same RPCs in front of them), [`health`]
//!   (database-backed health), [`ops_http`]
//!   (`/metrics` and the status page), [`cleanup_cmd`] and [`api_keys_cmd`]
//!   (the `cleanup` and `keys` subcommands); above them [`mcp`] (the MCP
//!   tools, served at `/mcp` through `api`'s gates in this process, or on
//!   stdio by `oncely mcp` over gRPC).
//! - The decisions: [`idempotency`] (the key newtype, the fingerprint, the
//!   create / replay / refuse decision in `create.rs`, the replay cache),
//!   [`queue`] (leases, completion, failure with its retry policy in
//!   `retry.rs`, cancellation, waiting) and [`auth`] (API keys and the key
//!   ring calls are checked against).
//! - [`storage`]: every SQL statement, behind the [`storage::Store`] trait,
//!   for PostgreSQL and for the embedded SQLite store; the stores write
//!   what the layers above decided.
//! - [`domain`] (requests parsed once, stored tasks, the lease cut; no I/O)
//!   and [`metrics`] (the Prometheus registry).
//! - [`proto`] (the API's types, shared with the `oncely-client` crate),
//!   [`codec`] (the wire codec of the server's stubs) and [`telemetry`]
//!   (logs and traces).
//!
//! The retrying client for agents is the separate `oncely-client` crate;
//! docs/architecture.md walks through a keyed CreateTask.
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
pub mod mcp;
pub mod metrics;
pub mod ops_http;
pub mod proto;
pub mod queue;
pub mod startup;
pub mod storage;
pub mod telemetry;

pub use config::Settings;
pub use startup::{run, serve};
