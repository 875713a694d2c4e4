//! Like Redis's protected mode: an open server only on loopback.

use super::StartupError;
use crate::auth::{AuthMode, KeyRing};

/// Like Redis's protected mode: with no key and no explicit setting, the
/// server serves only a loopback address. Logs what the setting means.
pub(super) fn check(
    ring: &KeyRing,
    mode: AuthMode,
    addr: Option<std::net::SocketAddr>,
) -> Result<(), StartupError> {
    match mode {
        AuthMode::Disabled => {
            tracing::warn!(
                "AUTH=disabled: every call is let in without an API key; only for a trusted network"
            );
        }
        AuthMode::Required if !ring.any_key() => {
            tracing::warn!(
                "AUTH=required and no API key exists: every call but health and reflection is refused until one is created (`oncely keys create`)"
            );
        }
        AuthMode::Auto if !ring.any_key() => match addr {
            Some(addr) if addr.ip().is_loopback() => tracing::info!(
                "no API key exists: serving without authentication on a loopback address; calls need keys as soon as one is created"
            ),
            // An address that is not loopback, or one that cannot be told:
            // refuse rather than serve open.
            addr => {
                return Err(StartupError::Unprotected {
                    addr: addr.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
                });
            }
        },
        _ => tracing::info!("calls need an API key"),
    }
    Ok(())
}
