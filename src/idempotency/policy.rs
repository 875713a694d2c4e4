//! Which records answer a request, and for how long.

use std::{str::FromStr, time::Duration};

use super::key::IdempotencyKey;

/// The scope of keys sent to CreateTask: its full gRPC method name.
pub const CREATE_TASK_SCOPE: &str = "tasks.v1.TaskService/CreateTask";

/// The scope of records for keyless CreateTask calls deduplicated by
/// fingerprint. A scope of its own, so keyed and keyless records never
/// answer for each other.
pub const KEYLESS_CREATE_TASK_SCOPE: &str = "tasks.v1.TaskService/CreateTask#fingerprint";

/// What to do with a CreateTask that carries no `idempotency-key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKeyPolicy {
    /// Refuse it with INVALID_ARGUMENT (the default).
    #[default]
    Reject,
    /// Deduplicate it against identical requests within the dedup window.
    Fingerprint,
}

impl MissingKeyPolicy {
    /// Every policy's name, as configuration spells it.
    pub const NAMES: [&str; 2] = ["reject", "fingerprint"];
}

impl FromStr for MissingKeyPolicy {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "reject" => Ok(Self::Reject),
            "fingerprint" => Ok(Self::Fingerprint),
            other => Err(format!(
                "unknown missing-key policy {other:?}; use reject or fingerprint"
            )),
        }
    }
}

/// How long records answer for retries, and what a missing key means.
#[derive(Debug, Clone, Copy)]
pub struct KeyPolicy {
    /// Keyed records older than this are treated as absent.
    pub retention: Duration,
    /// What to do without a key.
    pub missing_key: MissingKeyPolicy,
    /// Keyless records older than this are treated as absent.
    pub dedup_window: Duration,
}

/// Where the record that answers a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource<'a> {
    /// The client's `idempotency-key`.
    Header(&'a IdempotencyKey),
    /// No key: the request's own fingerprint, within the dedup window.
    Fingerprint,
}

impl KeySource<'_> {
    /// The value of the `idempotency-key-source` response metadata.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeySource::Header(_) => "header",
            KeySource::Fingerprint => "fingerprint",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_from_their_names() {
        for name in MissingKeyPolicy::NAMES {
            assert!(name.parse::<MissingKeyPolicy>().is_ok());
        }
        assert_eq!("fingerprint".parse(), Ok(MissingKeyPolicy::Fingerprint));
        assert!("allow".parse::<MissingKeyPolicy>().is_err());
    }
}
