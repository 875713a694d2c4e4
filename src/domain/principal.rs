//! Who calls: an API key's name, role and scope.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Role {
    /// TaskService, for the agent ids bound to the key.
    Agent,
    /// WorkerService, for the actions bound to the key (any when none).
    Worker,
    /// Everything, Admin included.
    Admin,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    /// The CLI's spelling (clap's `ValueEnum`), which the database shares.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        <Role as clap::ValueEnum>::from_str(name, false)
            .map_err(|_| format!("unknown role {name:?}; use agent, worker or admin"))
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's name: 1 to 64 characters of `[A-Za-z0-9._-]`.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The agents an agent key acts for.
    pub agent_ids: Vec<String>,
    /// The actions a worker key performs; empty means any.
    pub actions: Vec<String>,
}

impl Principal {
    /// Whether this caller may act for `agent_id`.
    pub fn may_act_for(&self, agent_id: &str) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Agent => self.agent_ids.iter().any(|a| a == agent_id),
            Role::Worker => false,
        }
    }

    /// Whether this caller may perform tasks of `action`.
    pub fn may_perform(&self, action: &str) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Worker => self.actions.is_empty() || self.actions.iter().any(|a| a == action),
            Role::Agent => false,
        }
    }
}

/// The longest key name.
pub const MAX_KEY_NAME: usize = 64;

/// Checks a key name: 1 to 64 characters of `[A-Za-z0-9._-]` (so it can
/// prefix an idempotency key unambiguously, and shows safely in logs).
pub fn check_key_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_KEY_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "a key name is 1 to {MAX_KEY_NAME} characters of letters, digits, '.', '_' and '-'"
        ))
    }
}

/// An API key as stored (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// The caller it stands for.
    pub principal: Principal,
    /// SHA-256 of the token.
    pub token_hash: [u8; 32],
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// The token it had before its last rotation, still accepted until the
    /// end of the grace period.
    pub previous: Option<PreviousToken>,
}

/// A rotated-out token, accepted until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousToken {
    /// SHA-256 of the token.
    pub token_hash: [u8; 32],
    /// When it stops being accepted.
    pub until: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, agent_ids: &[&str], actions: &[&str]) -> Principal {
        Principal {
            name: "k".into(),
            role,
            agent_ids: agent_ids.iter().map(|s| s.to_string()).collect(),
            actions: actions.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn roles_are_spelled_alike_in_the_cli_and_the_database() {
        for role in <Role as clap::ValueEnum>::value_variants() {
            assert_eq!(role.as_str().parse(), Ok(*role));
            let cli_name = clap::ValueEnum::to_possible_value(role).unwrap();
            assert_eq!(cli_name.get_name(), role.as_str());
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn scopes_follow_the_role() {
        let agent = principal(Role::Agent, &["a-1"], &[]);
        assert!(agent.may_act_for("a-1") && !agent.may_act_for("a-2"));
        assert!(!agent.may_perform("send_email"));
        let worker = principal(Role::Worker, &[], &["send_email"]);
        assert!(worker.may_perform("send_email") && !worker.may_perform("charge"));
        assert!(!worker.may_act_for("a-1"));
        let any_worker = principal(Role::Worker, &[], &[]);
        assert!(any_worker.may_perform("charge"));
        let admin = principal(Role::Admin, &[], &[]);
        assert!(admin.may_act_for("x") && admin.may_perform("y"));
    }

    #[test]
    fn key_names_are_plain() {
        assert!(check_key_name("ci-agent_1.prod").is_ok());
        for bad in ["", "a b", "a:b", "é", &"x".repeat(65)] {
            assert!(check_key_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!("worker".parse(), Ok(Role::Worker));
        assert!("root".parse::<Role>().is_err());
    }
}
