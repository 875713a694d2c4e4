//! Compiles `proto/` with protox (pure Rust, so no system `protoc` is needed)
//! into the server stubs and into a file descriptor set for reflection. The
//! messages and client stubs come from the `oncely-client` crate, so the
//! server and its clients share one copy of every type.

use std::{
    env,
    path::{Path, PathBuf},
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");

    let mut files = Vec::new();
    find_protos(Path::new("proto"), &mut files)?;
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

/// Every `.proto` file under `dir`, relative to `proto/`, in a stable order.
fn find_protos(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            find_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path.strip_prefix("proto")?.to_path_buf());
        }
    }
    Ok(())
}
