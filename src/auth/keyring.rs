//! The keys a running server accepts: loaded from the database and
//! reloaded every few seconds, so a key created or revoked with
//! `oncely keys` takes effect on every instance without a restart.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;

use super::token::token_hash;
use crate::{
    domain::Principal,
    storage::{StorageError, Store},
};

/// Whether calls need a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AuthMode {
    /// Keys are required as soon as one exists (revoked ones count); until
    /// then the server runs open, but only on a loopback address.
    #[default]
    Auto,
    /// Every call needs a key.
    Required,
    /// No call needs a key, whatever exists: for a trusted network only.
    Disabled,
}

/// Why a call was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer` metadata.
    #[error(
        "this server requires an API key: send the metadata `authorization: Bearer <token>` (an operator creates keys with `oncely keys create`)"
    )]
    Missing,
    /// A token this server does not know, one that was revoked, or one
    /// rotated out whose grace period is over.
    #[error("the API key is not valid: it is unknown, was revoked, or was rotated out")]
    Unknown,
}

/// What the ring knows at one moment.
#[derive(Debug, Default)]
struct Snapshot {
    /// Live keys by token hash, each with when it stops being accepted (a
    /// token rotated out, in its grace period).
    live: HashMap<[u8; 32], (Principal, Option<DateTime<Utc>>)>,
    /// Every key ever created, revoked ones too.
    all: Vec<Principal>,
    /// Whether any key was ever created.
    any: bool,
}

/// The live keys of a running server.
#[derive(Debug, Clone)]
pub struct KeyRing {
    mode: AuthMode,
    snapshot: Arc<RwLock<Snapshot>>,
}

impl KeyRing {
    /// Loads the keys from `store`.
    pub async fn load<S: Store>(store: &S, mode: AuthMode) -> Result<Self, StorageError> {
        let ring = Self {
            mode,
            snapshot: Arc::default(),
        };
        ring.reload(store).await?;
        Ok(ring)
    }

    /// Reloads the keys every `every`, until the handle is aborted. A failed
    /// reload keeps the last keys (and is logged).
    pub fn refresh<S: Store>(&self, store: S, every: Duration) -> JoinHandle<()> {
        let ring = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Err(error) = ring.reload(&store).await {
                    tracing::warn!(error = %crate::telemetry::chain(&error), "cannot reload the API keys; keeping the last ones");
                }
            }
        })
    }

    async fn reload<S: Store>(&self, store: &S) -> Result<(), StorageError> {
        let keys = store.api_keys().await?;
        let snapshot = Snapshot {
            any: !keys.is_empty(),
            live: keys
                .iter()
                .filter(|k| k.revoked_at.is_none())
                .flat_map(|k| {
                    let previous = k
                        .previous
                        .map(|p| (p.token_hash, (k.principal.clone(), Some(p.until))));
                    std::iter::once((k.token_hash, (k.principal.clone(), None))).chain(previous)
                })
                .collect(),
            all: keys.into_iter().map(|k| k.principal).collect(),
        };
        if let Ok(mut current) = self.snapshot.write() {
            *current = snapshot;
        }
        Ok(())
    }

    /// Whether calls need a key now.
    pub fn required(&self) -> bool {
        match self.mode {
            AuthMode::Required => true,
            AuthMode::Disabled => false,
            AuthMode::Auto => self.snapshot.read().map(|s| s.any).unwrap_or(true),
        }
    }

    /// Whether any key was ever created.
    pub fn any_key(&self) -> bool {
        self.snapshot.read().map(|s| s.any).unwrap_or(true)
    }

    /// The names of every key, revoked ones too, that may act for
    /// `agent_id`: its agent keys and every admin key.
    pub fn names_acting_for(&self, agent_id: &str) -> Vec<String> {
        self.snapshot
            .read()
            .map(|s| {
                s.all
                    .iter()
                    .filter(|p| p.may_act_for(agent_id))
                    .map(|p| p.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The names of the live agent keys that act for `agent_id` (not the
    /// admin keys, which act for every agent).
    pub fn agent_keys_for(&self, agent_id: &str) -> Vec<String> {
        self.snapshot
            .read()
            .map(|s| {
                let mut names: Vec<String> = s
                    .live
                    .values()
                    .filter(|(p, _)| {
                        p.role == crate::domain::Role::Agent && p.may_act_for(agent_id)
                    })
                    .map(|(p, _)| p.name.clone())
                    .collect();
                names.sort_unstable();
                names.dedup();
                names
            })
            .unwrap_or_default()
    }

    /// The caller a bearer token stands for. `token` is the metadata
    /// value's text after `Bearer `; `None` when there was none.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let hash = token_hash(token);
        let now = Utc::now();
        self.snapshot
            .read()
            .ok()
            .and_then(|s| match s.live.get(&hash) {
                Some((principal, until)) if until.is_none_or(|until| now < until) => {
                    Some(principal.clone())
                }
                _ => None,
            })
            .ok_or(AuthError::Unknown)
    }
}
