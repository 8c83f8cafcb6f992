//! keel-proto: etcd's v3 wire protocol, written for Keel from etcd's published field numbers, plus
//! Keel's internal raft payloads (`keelpb`).
//!
//! Owns: the generated message types and gRPC service stubs. Calls nothing else in Keel.
#![allow(clippy::all)]
#![allow(missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
pub mod authpb {
    tonic::include_proto!("authpb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}
pub mod keelpb {
    tonic::include_proto!("keelpb");
}
