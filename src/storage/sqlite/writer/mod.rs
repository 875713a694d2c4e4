//! The single writer of the SQLite store.
//!
//! SQLite lets one transaction write at a time. Rather than let pooled
//! connections race for the write lock (and surface "database is locked"),
//! every write is a job sent to one writer task that owns one connection
//! (on a thread of its own, see [`Writer::start`]).
//! Because the writer task, not the request, runs each transaction, a
//! cancelled request cannot leave one half done.
//!
//! Group commit: the writer takes every job queued when it gets to them
//! and runs them in one IMMEDIATE transaction, so they share one fsync.
//! Every job is answered only once the transaction has committed (or with
//! an error if it could not). What is asked often runs together, since
//! every statement is a round trip to the connection's own thread: claims
//! of keys in a few statements, completions in one, lease orders of one
//! shape in one read and one write per round. If such a statement fails,
//! its part is undone and each of its requests runs alone; any other job
//! runs in a savepoint of its own. Either way one request's failure is
//! its own. This module is only the machinery; the statements are in
//! [`super::queries`].
//!
//! - `handle.rs`: [`Writer`], the handle callers send work through.
//! - `jobs.rs`: what is sent ([`WriteJob`](jobs::WriteJob)s, and claims, completions and
//!   lease orders) and how each is answered once its transaction ends.
//! - `transaction.rs`: the writer task, one IMMEDIATE transaction per
//!   batch.

mod handle;
mod jobs;
mod transaction;

pub(super) use handle::Writer;
