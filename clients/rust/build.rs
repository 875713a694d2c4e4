//! Compiles the API in `proto/` (the repository's top-level `proto/`, through
//! a symlink) into messages and client stubs, with protox: pure Rust, so no
//! system `protoc` is needed.

use std::path::Path;

#[path = "find_protos.rs"]
mod find_protos;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = find_protos::find_protos(Path::new("proto"))?;

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&files)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
