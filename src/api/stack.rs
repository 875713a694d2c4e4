//! The gates every call passes through, in the one order they work in.
//! Each reads what the gates above it put in the request's extensions, so
//! the order is written here once and `tests/api/layer_order.rs` holds it.

use std::time::Duration;

use tower::Layer;

use super::{
    ApiKeyGate, IdempotencyKeyGate, RateGate, RateLimits, RewriteOversize, RpcMetrics, TrackCalls,
    gate::Gated,
};
use crate::{auth::KeyRing, idempotency::MissingKeyPolicy};

/// The stack of gates around the server's services, outermost first.
#[derive(Debug, Clone)]
pub struct CallStack {
    metrics: RpcMetrics,
    connection: TrackCalls,
    oversize: RewriteOversize,
    api_keys: ApiKeyGate,
    rates: RateGate,
    idempotency_keys: IdempotencyKeyGate,
}

impl CallStack {
    /// The stack: API keys checked against `ring`, `limits` kept per
    /// caller, calls cut after `request_timeout`, a CreateTask without an
    /// idempotency key treated as `missing_key` says. Creates the RPC
    /// metrics' series at zero.
    pub fn new(
        ring: KeyRing,
        limits: RateLimits,
        request_timeout: Duration,
        missing_key: MissingKeyPolicy,
    ) -> Self {
        Self {
            metrics: RpcMetrics::new(),
            connection: TrackCalls::new(request_timeout),
            oversize: RewriteOversize,
            api_keys: ApiKeyGate::new(ring),
            rates: RateGate::new(limits),
            idempotency_keys: IdempotencyKeyGate::new(missing_key),
        }
    }

    /// The API key gate, for a surface's own door (MCP's `/mcp`).
    pub fn api_keys(&self) -> &ApiKeyGate {
        &self.api_keys
    }

    /// Forgets the callers and peers whose rate buckets are full again, so
    /// that their tables do not grow without bound; call it now and then.
    pub fn forget_idle(&self) {
        self.rates.forget_idle_callers();
        self.api_keys.forget_idle_peers();
    }
}

/// The service a [`CallStack`] makes of `S`.
pub type Stacked<S> = Gated<
    Gated<
        Gated<Gated<Gated<Gated<S, IdempotencyKeyGate>, RateGate>, ApiKeyGate>, RewriteOversize>,
        TrackCalls,
    >,
    RpcMetrics,
>;

impl<S> Layer<S> for CallStack {
    type Service = Stacked<S>;

    /// Wraps `services` from the inside out; read it bottom up for the
    /// order a call goes through.
    fn layer(&self, services: S) -> Self::Service {
        // 6. Reads the `Rpc` (only CreateTask needs a key); writes the
        //    `IdempotencyKey` the service reads. After API keys and rates,
        //    so that who calls and how often are decided before what the
        //    call holds; its refusals are counted as CreateTask outcomes.
        //    Sends a replay's stored bytes in place of tonic's encoding,
        //    before the rate gate reads the answer's size.
        let keyed = Gated::new(services, self.idempotency_keys);
        // 5. Reads the `Rpc` (health and reflection are exempt), the
        //    `Principal` (the caller is its key, else its peer's
        //    `TcpConnectInfo`), and the answer's `AnswerSize`. Under the
        //    API key gate so that each key has a bucket of its own.
        let limited = Gated::new(keyed, self.rates.clone());
        // 4. Reads the `Rpc` (whose roles) and the `TcpConnectInfo` (to
        //    slow down a peer guessing keys); writes the `Principal`.
        let authenticated = Gated::new(limited, self.api_keys.clone());
        // 3. Rewrites tonic's OUT_OF_RANGE for an oversized message, which
        //    comes from the services' decoding, under every gate.
        let rewritten = Gated::new(authenticated, self.oversize);
        // 2. Reads the guarded socket's `ConnectionInfo`; writes the
        //    `TcpConnectInfo` the gates under it read the peer from. Its
        //    timeout covers every gate under it, and a call holds its
        //    connection open until its answer is sent.
        let tracked = Gated::new(rewritten, self.connection);
        // 1. Outermost: parses the path into the `Rpc` every gate reads,
        //    and counts every call, refusals and timeouts of the gates
        //    under it included, with the status it really got.
        Gated::new(tracked, self.metrics)
    }
}
