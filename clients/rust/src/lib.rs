//! The client library for oncely: create tasks exactly once from agents
//! that retry.
//!
//! An agent makes one logical call with one idempotency key, generated
//! before the first attempt and sent on every retry; the server creates one
//! task per key and answers every retry with the first response. This crate
//! does that for you and holds nothing of the server: it depends on tonic,
//! prost and tokio, and on no database driver.
//!
//! ```no_run
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
//! # Ok(())
//! # }
//! ```
//!
//! - [`OncelyClient`]: the retrying client ([`RetryPolicy`] bounds it).
//! - [`proto`]: the generated messages and client stubs of every service.
//! - [`metadata`]: the names of the request and response metadata.
//! - [`json`]: `serde_json` values to and from `google.protobuf.Struct`.
#![forbid(unsafe_code)]

mod client;
pub mod json;
pub mod metadata;
pub mod proto;

pub use client::{ClientError, Created, OncelyClient, RetryPolicy, is_transient};
