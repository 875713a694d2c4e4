//! The API's types: messages and client stubs from `oncely-client`, server
//! stubs generated from `proto/` by `build.rs`.
#![allow(missing_docs, unreachable_pub, clippy::all)]

/// The `tasks.v1` package: `TaskService`, `Admin` and their messages.
pub mod tasks_v1 {
    pub use oncely_client::proto::tasks_v1::*;
    tonic::include_proto!("tasks.v1");
}

/// The encoded `FileDescriptorSet` of `proto/` and its imports, served by
/// reflection so grpcurl works without proto files.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/oncely_descriptor.bin"));
