//! Generates the wire types from `proto/*.proto` with a vendored `protoc`, so a fresh machine
//! needs no system install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    // The encoded descriptors feed gRPC server reflection (`quiver_proto::FILE_DESCRIPTOR_SET`).
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("quiver_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::SliceCodec")
        .compile_protos(&["proto/peer.proto", "proto/control.proto"], &["proto"])?;
    Ok(())
}
