//! Compiles `proto/nes/v1/messenger.proto` into tonic + prost code.
//!
//! The `.proto` is parsed with protox, a pure-Rust protobuf compiler, so building NES
//! needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/nes/v1/messenger.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
