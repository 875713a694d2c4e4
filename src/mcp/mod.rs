//! MCP, the Model Context Protocol most agents reach tools through: tools
//! that create, read, wait for, cancel and list tasks, with the same
//! idempotency contract as every other surface (one key, one task; a retry
//! gets the first answer, marked replayed; a key reused with other
//! arguments is a conflict). Built on `rmcp`, the official Rust SDK.
//!
//! Two transports share the one [`OncelyMcp`] server:
//! - streamable HTTP at `/mcp` on `MCP_ADDR` (`http.rs`), whose calls go
//!   through the server's own gates in this process, with the caller's
//!   Bearer key;
//! - stdio (`oncely mcp`, `stdio.rs`), for desktop agents that spawn their
//!   servers, whose calls go over gRPC to a running server.
//!
//! `create_task` is keyed by its `idempotency_key` argument; else by the
//! `Idempotency-Key` header of the HTTP request that carried it; else it
//! is deduplicated by fingerprint within the server's dedup window
//! (`idempotency-fallback: fingerprint`). Its answer says which
//! (`key_source`) and whether it was a replay (`replayed`).

mod calls;
mod handler;
mod handles;
mod http;
mod stdio;
pub mod tools;

pub use calls::{Caller, Tasks};
pub use handler::OncelyMcp;
pub use http::{MCP_PATH, McpHttpSettings, router};
pub use stdio::{McpArgs, McpError, run as run_stdio};
