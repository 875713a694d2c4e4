//! The gRPC metadata of oncely's idempotency contract and of its API keys.

/// Request metadata: the idempotency key of a logical call (a UUID v4
/// generated before the first attempt and sent on every retry).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Response metadata: `true` when the answer is the stored response of an
/// earlier attempt, `false` when this request created the task.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Response metadata: which rule deduplicated a CreateTask, `header` (the
/// `idempotency-key`) or `fingerprint` (a keyless request, deduplicated by
/// its content).
pub const IDEMPOTENCY_KEY_SOURCE: &str = "idempotency-key-source";

/// Request metadata: `fingerprint` asks that a CreateTask sent without
/// `idempotency-key` be deduplicated by its content within the server's
/// dedup window, whatever the server's `MISSING_KEY_POLICY` (for callers
/// that may or may not have a key, such as the MCP tools). A keyed request
/// ignores it.
pub const IDEMPOTENCY_FALLBACK: &str = "idempotency-fallback";

/// Request metadata: the API key, as `Bearer <token>`. Set it with
/// [`OncelyClient::with_api_key`](crate::OncelyClient::with_api_key) or
/// [`WorkerOptions::api_key`](crate::WorkerOptions::api_key).
pub const AUTHORIZATION: &str = "authorization";
