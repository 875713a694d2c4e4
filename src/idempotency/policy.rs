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

/// What to do with records written before keys were scoped by agent,
/// which were scoped by the API key that wrote them (`"<key name> <key>"`,
/// or the bare key without authentication).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LegacyScope {
    /// Honour them while any may be live (the retention after the last was
    /// written); write agent-scoped records only. The default.
    #[default]
    Read,
    /// Honour them, and write each record also under the calling key's
    /// name, so that instances of an earlier version running beside this
    /// one (a rolling upgrade) see it too. PostgreSQL only.
    Dual,
    /// Ignore them.
    Off,
}

impl LegacyScope {
    /// Every mode's name, as configuration spells it.
    pub const NAMES: [&str; 3] = ["read", "dual", "off"];
}

impl FromStr for LegacyScope {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "read" => Ok(Self::Read),
            "dual" => Ok(Self::Dual),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown legacy key scope {other:?}; use read, dual or off"
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
    /// What records of the earlier, per-API-key scope count for.
    pub legacy: LegacyScope,
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
        for name in LegacyScope::NAMES {
            assert!(name.parse::<LegacyScope>().is_ok());
        }
        assert!("both".parse::<LegacyScope>().is_err());
        assert_eq!("fingerprint".parse(), Ok(MissingKeyPolicy::Fingerprint));
        assert!("allow".parse::<MissingKeyPolicy>().is_err());
    }
}
