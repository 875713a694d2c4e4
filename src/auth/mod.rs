//! Who may call: API keys (created, listed and revoked by the operator's
//! `oncely keys` commands), and the key ring the server checks each call
//! against.
//!
//! - [`token`]: making a token and the hash that is stored in its place.
//! - [`api_keys`]: creating, listing, rotating and revoking keys.
//! - [`keyring`]: the live keys of a running server, refreshed from the
//!   database so a revocation reaches every instance within seconds.

pub mod api_keys;
pub mod keyring;
pub mod token;

pub use api_keys::{ApiKeyError, create_key, list_keys, revoke_key, rotate_key};
pub use keyring::{AuthError, AuthMode, KeyRing};
