//! Creating, listing and revoking API keys: what `oncely keys` does, against
//! the database directly, so it works with the server running or not.

use crate::{
    domain::{ApiKeyRecord, MAX_NAME_BYTES, Principal, Role, principal::check_key_name},
    storage::{StorageError, Store},
};

use super::token::{new_token, token_hash};

/// Why a key could not be created or revoked.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// The request breaks a rule.
    #[error("{0}")]
    Invalid(String),
    /// A key of that name exists (revoked keys keep their names).
    #[error("a key named {0:?} exists already; choose another name")]
    NameTaken(String),
    /// No live key of that name.
    #[error("no live key is named {0:?}; `oncely keys list` shows the keys")]
    NotFound(String),
    /// The operating system gave no random bytes.
    #[error("cannot make a random token: {0}")]
    Random(getrandom::Error),
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Creates a key and returns its token, which is shown this once and never
/// stored. An agent key must name the agent ids it acts for; a worker key
/// may name the actions it performs (none: any); an admin key names none.
pub async fn create_key<S: Store>(
    store: &S,
    name: &str,
    role: Role,
    agent_ids: Vec<String>,
    actions: Vec<String>,
) -> Result<String, ApiKeyError> {
    check_key_name(name).map_err(ApiKeyError::Invalid)?;
    match role {
        Role::Agent if agent_ids.is_empty() => {
            return Err(ApiKeyError::Invalid(
                "an agent key acts for named agents: give at least one --agent-id".into(),
            ));
        }
        Role::Agent if !actions.is_empty() => {
            return Err(ApiKeyError::Invalid(
                "--action is for worker keys; an agent key is scoped by --agent-id".into(),
            ));
        }
        Role::Worker if !agent_ids.is_empty() => {
            return Err(ApiKeyError::Invalid(
                "--agent-id is for agent keys; a worker key is scoped by --action".into(),
            ));
        }
        Role::Admin if !agent_ids.is_empty() || !actions.is_empty() => {
            return Err(ApiKeyError::Invalid(
                "an admin key may do everything; it takes no --agent-id or --action".into(),
            ));
        }
        _ => {}
    }
    for value in agent_ids.iter().chain(&actions) {
        if value.is_empty() || value.len() > MAX_NAME_BYTES || value.contains('\0') {
            return Err(ApiKeyError::Invalid(format!(
                "agent ids and actions are 1 to {MAX_NAME_BYTES} bytes without NUL"
            )));
        }
    }
    let token = new_token().map_err(ApiKeyError::Random)?;
    let record = ApiKeyRecord {
        principal: Principal {
            name: name.to_owned(),
            role,
            agent_ids,
            actions,
        },
        token_hash: token_hash(&token),
        created_at: chrono::Utc::now(),
        revoked_at: None,
        previous: None,
    };
    if !store.insert_api_key(&record).await? {
        return Err(ApiKeyError::NameTaken(name.to_owned()));
    }
    Ok(token)
}

/// Every key, revoked ones included, oldest first.
pub async fn list_keys<S: Store>(store: &S) -> Result<Vec<ApiKeyRecord>, ApiKeyError> {
    Ok(store.api_keys().await?)
}

/// Gives a live key a new token, which it returns (shown this once, never
/// stored): same name, role and scope. The current token keeps working for
/// `grace` (zero: it stops now), then every instance refuses it within its
/// key refresh interval; a token rotated out before is dropped. Returns the
/// new token and when the old one stops working.
pub async fn rotate_key<S: Store>(
    store: &S,
    name: &str,
    grace: std::time::Duration,
) -> Result<(String, chrono::DateTime<chrono::Utc>), ApiKeyError> {
    let token = new_token().map_err(ApiKeyError::Random)?;
    match store
        .rotate_api_key(name, &token_hash(&token), grace)
        .await?
    {
        Some(until) => Ok((token, until)),
        None => Err(ApiKeyError::NotFound(name.to_owned())),
    }
}

/// Revokes a live key. Running servers stop accepting it within their key
/// refresh interval.
pub async fn revoke_key<S: Store>(store: &S, name: &str) -> Result<(), ApiKeyError> {
    if store.revoke_api_key(name).await? {
        Ok(())
    } else {
        Err(ApiKeyError::NotFound(name.to_owned()))
    }
}
