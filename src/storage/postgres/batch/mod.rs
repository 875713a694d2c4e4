//! Group commit on PostgreSQL: of claims, completions and leases.
//!
//! A [`Batcher`] sends what arrives concurrently to the database together,
//! through its [`BatchJob`]: [`Claims`] for CreateTask, [`Completions`] for
//! CompleteTask (each completion still answers its own outcome; a repeat
//! of a task in one batch goes after the batch, on its own), [`Leases`] for
//! LeaseTasks (the orders of a batch take the tasks it chose in turn, and
//! it locks only those).
//!
//! - `engine.rs`: the batching itself (lanes, caps, the batch-size tally)
//!   and [`PoolWithWakeups`], where every job's batches go.
//! - `claims.rs`, `completions.rs`, `leases.rs`: the three jobs.

mod claims;
mod completions;
mod engine;
mod leases;

pub(super) use claims::Claims;
pub(super) use completions::Completions;
pub(super) use engine::{Batcher, PoolWithWakeups, Tally};
pub(super) use leases::{LeaseRequest, Leases};
