//! Bounded time per connection, so that what a connection holds is bounded.
//!
//! HTTP/2 keepalive finds peers that vanished, but not peers that stay and
//! do nothing useful: a connection that never sends a request (or sends its
//! preface a byte at a time), a request whose body never finishes arriving,
//! an answer the peer never reads (its flow-control window stays shut, so
//! the answer sits in the server's memory). [`GuardedIo`] wraps each
//! accepted socket (`guarded_io.rs`) and the [`TrackCalls`] gate
//! (`track_calls.rs`) tells it which calls are open on it, through the
//! connection's [`watch::Watch`] (`watch.rs`); the socket is closed when
//!
//! - no call has been open on it for the idle timeout (counted from the
//!   accept, so a connection that never starts a call is closed too), or
//! - a call has been open longer than the call limit (the request timeout
//!   plus time to send the answer), whatever it is waiting for.
//!
//! Closing the socket drops every stream on it and the memory they held.
//! Health `Watch` streams are endless by design: they keep a connection
//! from being idle and have a limit of their own (an hour by default), after
//! which the client opens a new connection and watches again.

mod guarded_io;
mod track_calls;
mod watch;

pub use guarded_io::{ConnectionInfo, GuardedIo};
pub use track_calls::TrackCalls;
pub(super) use track_calls::peer_ip;
pub use watch::{CallGuard, ConnectionLimits};
