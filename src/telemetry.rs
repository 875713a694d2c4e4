//! Tracing set-up: `RUST_LOG` controls verbosity (default `info`); logs go
//! to standard error so standard output stays for command output.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. Calling it twice is harmless.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
