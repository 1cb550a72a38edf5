//! Generated code of the `bd3lm.v1` gRPC contracts: the public `Generation` service of the
//! coordinator and the internal `DenoiseWorker` service, and the conversions between the
//! wire's sampling parameters and the typed ones of `bd3lm-sampling`; [`auth`], the
//! bearer tokens servers check and clients attach; [`tls`], the servers' and clients' TLS;
//! [`status`], the statuses clients are shown for store faults.
#![warn(missing_docs)]

pub mod auth;
mod sampling;
pub mod status;
pub mod tls;

/// Package `bd3lm.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("bd3lm.v1");
}

/// Encoded descriptors of every message and service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("bd3lm_descriptor");
