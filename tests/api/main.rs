//! Black-box tests: the real server over gRPC on TCP, against a real
//! PostgreSQL, one fresh database per test.

mod cancellation;
mod cleanup;
mod concurrency;
mod create_task;
mod fingerprint;
mod health;
mod helpers;
mod in_flight;
mod process;
mod read_tasks;
mod reflection;
mod restart;
