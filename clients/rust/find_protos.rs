//! The `.proto` files of the API, found the same way by this crate's build
//! script and by the server's (which includes this file), so that adding a
//! file to `proto/` needs no edit in either.

use std::path::{Path, PathBuf};

/// Every `.proto` file under `root`, relative to it, in a stable order.
pub(crate) fn find_protos(root: &Path) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let mut found = Vec::new();
    walk(root, &mut found)?;
    found
        .into_iter()
        .map(|path| Ok(path.strip_prefix(root)?.to_path_buf()))
        .collect()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
