//! Compiles `proto/` with protox (pure Rust, so no system `protoc` is needed)
//! into the server stubs and into a file descriptor set for reflection. The
//! messages and client stubs come from the `oncely-client` crate, so the
//! server and its clients share one copy of every type.

use std::{
    env,
    path::{Path, PathBuf},
};

// The client crate's walker, so both build scripts find the same files.
#[path = "clients/rust/find_protos.rs"]
mod find_protos;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");

    let files = find_protos::find_protos(Path::new("proto"))?;
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&files)?;
    let fds = compiler.file_descriptor_set();

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("oncely_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(".tasks.v1", "::oncely_client::proto::tasks_v1")
        // Undecodable requests are the caller's error, not oncely's.
        .codec_path("crate::codec::OncelyCodec")
        .compile_fds(fds)?;
    Ok(())
}
