//! The server's modules import only from layers below their own, so there
//! is no cycle and each layer can be read without the ones above it:
//! api -> idempotency -> storage -> domain, with configuration and wiring on
//! top. This reads `src/` and fails naming every import that points up or
//! sideways.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// Each top-level module and its layer; a module may import only from
/// modules of a lower layer.
const LAYERS: &[(&str, u8)] = &[
    ("proto", 0),
    ("codec", 0),
    ("telemetry", 0),
    ("domain", 1),
    ("metrics", 1),
    ("storage", 2),
    ("idempotency", 3),
    ("queue", 3),
    ("auth", 3),
    ("api", 4),
    ("health", 4),
    ("ops_http", 4),
    ("cleanup_cmd", 4),
    ("api_keys_cmd", 4),
    // MCP's tools call the TaskService through `api`'s gates.
    ("mcp", 5),
    ("config", 6),
    ("startup", 7),
];

#[test]
fn every_module_imports_only_from_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut wrong = Vec::new();
    for file in rust_files(&src) {
        let relative = file.strip_prefix(&src).expect("under src");
        let module = top_module(relative);
        // The crate root and the binary see everything.
        if module == "lib" || module == "main" {
            continue;
        }
        let own = *layers.get(module.as_str()).unwrap_or_else(|| {
            panic!(
                "src/{} is in no layer; add it to LAYERS",
                relative.display()
            )
        });
        let text = std::fs::read_to_string(&file).expect("read source");
        let mut used_modules = paths_after(&text, "crate::");
        // In a file directly under src/, `super::` is the crate root too.
        if relative.components().count() == 1 {
            used_modules.extend(paths_after(&text, "super::"));
        }
        for used in used_modules {
            if used == module {
                continue;
            }
            match layers.get(used.as_str()) {
                Some(&layer) if layer < own => {}
                Some(&layer) => wrong.push(format!(
                    "src/{} ({module}, layer {own}) imports crate::{used} (layer {layer})",
                    relative.display()
                )),
                None => {}
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that point up or sideways:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_import_scanner_sees_grouped_and_nested_paths() {
    let text = "use crate::{\n    domain::{NewTask, x},\n    storage::Store,\n};\nlet t = crate::api::timestamp(now);\nuse crate::{Settings, config::X};";
    assert_eq!(
        paths_after(text, "crate::"),
        ["domain", "storage", "api", "Settings", "config"]
    );
}

/// The top-level module a file belongs to: `storage` for
/// `storage/sqlite/writer/jobs.rs`, `config` for `config.rs`.
fn top_module(relative: &Path) -> String {
    let first = relative.components().next().expect("a path");
    let name = first.as_os_str().to_string_lossy();
    name.strip_suffix(".rs").unwrap_or(&name).to_owned()
}

/// The names that follow `prefix` (such as `crate::`), including each item
/// of a `crate::{a::.., b::..}` group.
fn paths_after(text: &str, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        rest = &rest[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: those at brace depth 0.
            let mut depth = 0;
            let mut name = String::new();
            let mut expecting_name = true;
            for c in group.chars() {
                let ident = c.is_alphanumeric() || c == '_';
                if depth == 0 && ident && expecting_name {
                    name.push(c);
                    continue;
                }
                if !name.is_empty() {
                    found.push(std::mem::take(&mut name));
                    expecting_name = false;
                }
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => expecting_name = true,
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}
