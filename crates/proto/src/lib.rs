//! The `dispatch.v1` wire protocol shared by the coordinator, the broker and the managers.
//!
//! This crate owns the generated messages and service stubs, plus small hand-written
//! conversions and checks beside them. It holds no service logic and must never depend on a
//! service crate.

pub mod job;

pub use job::{FieldError, JobId, JobSpec};

/// Generated code for package `dispatch.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod v1 {
    tonic::include_proto!("dispatch.v1");
}

/// Encoded `FileDescriptorSet` of every `dispatch.v1` file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/dispatch_descriptor.bin"));
