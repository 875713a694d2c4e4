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
//! Each job runs in a savepoint of its own, so that one job's failure is
//! its own, and every job is answered only once the transaction has
//! committed (or with an error if it could not). Claims of keys are run
//! together in a few statements. This module is only the machinery; the
//! statements are in [`super::queries`].
//!
//! - `handle.rs`: [`Writer`], the handle callers send work through.
//! - `jobs.rs`: what is sent ([`WriteJob`](jobs::WriteJob)s and claims) and how each is
//!   answered once its transaction ends.
//! - `transaction.rs`: the writer task, one IMMEDIATE transaction per
//!   batch.

mod handle;
mod jobs;
mod transaction;

pub(super) use handle::Writer;
