//! Generates the tonic/prost code for `proto/ballast/v1/ballast.proto`.
//!
//! Needs `protoc`: prost-build takes it from the `PROTOC` environment variable
//! when set, else from `PATH` (Debian's `protobuf-compiler` is enough).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("ballast/v1/ballast.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `bytes` fields as `bytes::Bytes`: block data is handed on without a copy.
        .bytes(".")
        // Their `Debug` is written by hand in lib.rs so the join token never reaches a log.
        .skip_debug([".ballast.v1.JoinNodeRequest", ".ballast.v1.AssignIdentityRequest"])
        .compile_protos(&[proto], &[root])?;
    Ok(())
}
