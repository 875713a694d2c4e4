//! The files in `deploy/` stay true to the binary: every setting the
//! environment file names is one the server reads (a renamed or misspelt
//! one would be silently ignored). `.ci/run` checks the systemd units with
//! `systemd-analyze verify`.

use std::{path::Path, process::Command};

/// Settings read by libraries rather than by the server's flags.
const LIBRARY_SETTINGS: &[&str] = &[
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
];

#[test]
fn every_setting_in_the_environment_file_is_one_the_server_reads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = std::fs::read_to_string(root.join("deploy/oncely.env")).expect("read oncely.env");
    let help = Command::new(env!("CARGO_BIN_EXE_oncely"))
        .arg("--help")
        .output()
        .expect("run oncely --help");
    let help = String::from_utf8_lossy(&help.stdout);

    let mut names = Vec::new();
    for line in file.lines() {
        // Settings, and settings left commented out for the operator.
        let setting = line.trim().trim_start_matches('#').trim();
        if let Some((name, _)) = setting.split_once('=')
            && !name.is_empty()
            && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        {
            names.push(name.to_owned());
        }
    }
    assert!(names.len() >= 5, "too few settings found: {names:?}");
    let unknown: Vec<_> = names
        .iter()
        .filter(|name| {
            !LIBRARY_SETTINGS.contains(&name.as_str())
                && !help.contains(&format!("[env: {name}="))
                && !help.contains(&format!("[env: {name}]"))
        })
        .collect();
    assert!(unknown.is_empty(), "not settings of oncely: {unknown:?}");
}
