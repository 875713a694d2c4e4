//! The client library for oncely: create tasks exactly once from agents
//! that retry, and perform them in workers.
//!
//! An agent makes one logical call with one idempotency key, generated
//! before the first attempt and sent on every retry; the server creates one
//! task per key and answers every retry with the first response. This crate
//! does that for you and holds nothing of the server: it depends on tonic,
//! prost and tokio, and on no database driver.
//!
//! ```no_run
//! use std::time::Duration;
//! use oncely_client::{OncelyClient, json, proto::tasks_v1::CreateTaskRequest};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = OncelyClient::connect("http://127.0.0.1:50051")?;
//! let created = client
//!     .create_task(CreateTaskRequest {
//!         agent_id: "agent-7".into(),
//!         action: "send_email".into(),
//!         parameters: Some(json::to_struct(serde_json::json!({"to": "ada@example.com"}))?),
//!     })
//!     .await?;
//! println!("task {} (replayed: {})", created.task.task_id, created.replayed);
//! // Wait up to two minutes for a worker to finish it.
//! let task = client.wait_task(&created.task.task_id, Duration::from_secs(120)).await?;
//! println!("status {:?}", task.status());
//! # Ok(())
//! # }
//! ```
//!
//! A worker leases tasks and runs a handler on each; delivery is at least
//! once, so the handler keys its side effect by the task id
//! ([`TaskContext::idempotency_key`]). See [`Worker`].
//!
//! - [`OncelyClient`]: the retrying client for agents, `wait_task` and
//!   `cancel_task` included ([`RetryPolicy`] bounds it).
//! - [`Worker`]: the lease loop, heartbeats, completion and graceful stop;
//!   handlers get a [`TaskContext`] and fail with a [`TaskError`].
//! - [`proto`]: the generated messages and client stubs of every service.
//! - [`metadata`]: the names of the request and response metadata.
//! - [`reasons`]: the `ErrorInfo` reasons of the server's refusals.
//! - API keys: [`OncelyClient::with_api_key`], [`WorkerOptions::api_key`]
//!   and [`api_key_from_env`] (`ONCELY_API_KEY`, read only when you call it).
//! - [`json`]: `serde_json` values to and from `google.protobuf.Struct`.
#![forbid(unsafe_code)]

mod auth;
mod client;
mod error;
pub mod json;
pub mod metadata;
pub mod proto;
pub mod reasons;
mod retry;
mod trace;
pub mod worker;

pub use auth::{API_KEY_ENV, api_key_from_env};
pub use client::{Created, OncelyClient, TlsOptions, channel, is_finished};
pub use error::ClientError;
pub use retry::{RetryPolicy, backoff, is_transient};
pub use worker::{CancelHandle, CancelReason, TaskContext, TaskError, Worker, WorkerOptions};
