//! Compiles `pledge/v1/*.proto` with protox (a pure-Rust protobuf compiler, so no `protoc`
//! needs to be installed) and generates the tonic clients and servers from the descriptors.
//! The encoded descriptor set is kept for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "pledge/v1/common.proto",
    "pledge/v1/coordinator.proto",
    "pledge/v1/participant.proto",
    "pledge/v1/reference.proto",
    "pledge/v1/postgres.proto",
    "pledge/v1/kafka.proto",
    "pledge/v1/mysql.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("pledge_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
