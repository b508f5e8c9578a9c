//! ballast-proto
pub mod pb {
    tonic::include_proto!("ballast.v1");
}
