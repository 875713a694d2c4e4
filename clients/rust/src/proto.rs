//! Code generated from `proto/` by `build.rs`: messages and client stubs.
#![allow(missing_docs, unreachable_pub, clippy::all)]

/// The `tasks.v1` package: `TaskService`, `WorkerService`, `Admin` and
/// their messages.
pub mod tasks_v1 {
    tonic::include_proto!("tasks.v1");
}
