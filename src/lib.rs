//! oncely: a gRPC service that makes agents' side effects happen exactly once.
//!
//! An agent calls `tasks.v1.TaskService/CreateTask` with an `idempotency-key`;
//! one key yields exactly one task, and every retry gets the first response
//! back byte for byte. The crate is laid out by layer:
//!
//! - [`api`]: the gRPC surface: the services, the layer that validates the
//!   `idempotency-key` metadata, and the one mapping from errors to `Status`.
//! - [`idempotency`]: the domain: the key newtype, the canonical JSON form and
//!   fingerprint of a request, and the create/replay/mismatch decision.
//! - [`domain`]: the validated `NewTask` that the storage layer accepts.
//! - [`storage`]: every SQL statement, over PostgreSQL with sqlx.
//! - [`config`]: flags and environment; [`startup`]: wiring and serving;
//!   [`health`]: the database-backed health status; [`cleanup_cmd`]: the
//!   `cleanup` subcommand for cron; [`client`]: a retrying client for agents
//!   written in Rust.
#![forbid(unsafe_code)]

pub mod api;
pub mod cleanup_cmd;
pub mod client;
pub mod config;
pub mod domain;
pub mod health;
pub mod idempotency;
pub mod proto;
pub mod startup;
pub mod storage;
pub mod telemetry;

pub use config::Settings;
pub use startup::{run, serve};
