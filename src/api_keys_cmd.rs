//! `oncely keys`: create, list and revoke API keys, straight in the
//! database named by `DATABASE_URL`, whether the server runs or not. Running
//! servers pick the change up within their key refresh interval.

use std::fmt::Write;

use clap::{Args, Subcommand};

use crate::{
    auth::{self, ApiKeyError},
    domain::{ApiKeyRecord, Role},
    storage::{Backend, DatabaseSettings, PgStore, SqliteStore, StorageError, Store, redact_url},
};

/// The `keys` subcommand's flags.
#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: KeysAction,
}

/// What `oncely keys` does.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysAction {
    /// Create a key and print its token, which is shown this once.
    Create {
        /// The key's name: letters, digits, '.', '_' and '-'.
        #[arg(long)]
        name: String,
        /// agent (TaskService for its agent ids), worker (WorkerService for
        /// its actions) or admin (everything).
        #[arg(long, value_enum)]
        role: Role,
        /// An agent id an agent key acts for (repeat for several).
        #[arg(long = "agent-id")]
        agent_ids: Vec<String>,
        /// An action a worker key performs (repeat for several; none: any).
        #[arg(long = "action")]
        actions: Vec<String>,
    },
    /// List the keys (never their tokens); a key rotated in its grace
    /// period shows its previous token too.
    List,
    /// Give a key a new token (same name, role and scope) and print it; the
    /// current token keeps working for the grace period.
    Rotate {
        /// The key's name.
        name: String,
        /// How long the current token keeps working (`24h`, `90s`; `0`:
        /// it stops now).
        #[arg(long, default_value = "24h", value_parser = grace)]
        grace: std::time::Duration,
    },
    /// Revoke a key: calls with its token are refused from then on.
    Revoke {
        /// The key's name.
        name: String,
    },
}

/// A grace period: `0`, or a duration such as `24h`, at most a year.
fn grace(text: &str) -> Result<std::time::Duration, String> {
    if text.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let grace = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if grace > std::time::Duration::from_secs(366 * 24 * 3600) {
        return Err("the grace period is at most a year".into());
    }
    Ok(grace)
}

/// Why `oncely keys` failed.
#[derive(Debug, thiserror::Error)]
pub enum KeysCmdError {
    /// The database URL names no store.
    #[error("DATABASE_URL {0:?} names no store oncely knows; use postgres://... or sqlite://PATH")]
    UnknownDatabase(String),
    /// The database could not be opened.
    #[error("cannot open the database at {url}")]
    Database {
        /// The redacted URL.
        url: String,
        /// The cause.
        #[source]
        source: StorageError,
    },
    /// The action failed.
    #[error(transparent)]
    Key(#[from] ApiKeyError),
}

/// What a successful run prints: `stdout` for scripts (a token, a table),
/// `stderr` for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Printed {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `oncely keys` against the database of `database`.
pub async fn run(database: &DatabaseSettings, args: &KeysArgs) -> Result<Printed, KeysCmdError> {
    let open_error = |source| KeysCmdError::Database {
        url: redact_url(&database.url),
        source,
    };
    match Backend::of_url(&database.url) {
        Some(Backend::Postgres) => {
            let store = PgStore::connect(database).await.map_err(open_error)?;
            act(&store, &args.action).await
        }
        Some(Backend::Sqlite) => {
            let store = SqliteStore::connect(database).await.map_err(open_error)?;
            act(&store, &args.action).await
        }
        None => Err(KeysCmdError::UnknownDatabase(redact_url(&database.url))),
    }
}

async fn act<S: Store>(store: &S, action: &KeysAction) -> Result<Printed, KeysCmdError> {
    Ok(match action {
        KeysAction::Create {
            name,
            role,
            agent_ids,
            actions,
        } => {
            let token =
                auth::create_key(store, name, *role, agent_ids.clone(), actions.clone()).await?;
            Printed {
                stdout: format!("{token}\n"),
                stderr: format!(
                    "created the {role} key {name:?}{}; its token (above) is shown this once: store it now\n",
                    scope(agent_ids, actions)
                ),
            }
        }
        KeysAction::List => Printed {
            stdout: table(&auth::list_keys(store).await?),
            stderr: String::new(),
        },
        KeysAction::Rotate { name, grace } => {
            let (token, until) = auth::rotate_key(store, name, *grace).await?;
            let old = if grace.is_zero() {
                "the old token stops working now".to_owned()
            } else {
                format!(
                    "the old token keeps working until {}",
                    until.format("%Y-%m-%dT%H:%M:%SZ")
                )
            };
            Printed {
                stdout: format!("{token}\n"),
                stderr: format!(
                    "rotated the key {name:?}: its new token (above) is shown this once: store it now; {old} (running servers refuse it within their key refresh interval after that)\n"
                ),
            }
        }
        KeysAction::Revoke { name } => {
            auth::revoke_key(store, name).await?;
            Printed {
                stdout: String::new(),
                stderr: format!(
                    "revoked the key {name:?}; running servers refuse it within their key refresh interval\n"
                ),
            }
        }
    })
}

fn scope(agent_ids: &[String], actions: &[String]) -> String {
    match (agent_ids.is_empty(), actions.is_empty()) {
        (false, _) => format!(" for agents {}", agent_ids.join(", ")),
        (true, false) => format!(" for actions {}", actions.join(", ")),
        (true, true) => String::new(),
    }
}

/// The keys as a table: name, role, scope, creation, and whether revoked;
/// a key's previous token, while it is accepted, on a line of its own.
fn table(keys: &[ApiKeyRecord]) -> String {
    let now = chrono::Utc::now();
    let mut out = String::from("NAME\tROLE\tSCOPE\tCREATED\tSTATUS\n");
    for key in keys {
        let p = &key.principal;
        let scope = match p.role {
            Role::Agent => format!("agents: {}", p.agent_ids.join(",")),
            Role::Worker if p.actions.is_empty() => "actions: any".to_owned(),
            Role::Worker => format!("actions: {}", p.actions.join(",")),
            Role::Admin => "everything".to_owned(),
        };
        let status = match key.revoked_at {
            Some(at) => format!("revoked {}", at.format("%Y-%m-%dT%H:%M:%SZ")),
            None => "active".to_owned(),
        };
        let created = key.created_at.format("%Y-%m-%dT%H:%M:%SZ");
        let _ = writeln!(out, "{}\t{}\t{scope}\t{created}\t{status}", p.name, p.role);
        if let Some(previous) = key
            .previous
            .filter(|p| key.revoked_at.is_none() && p.until > now)
        {
            let _ = writeln!(
                out,
                "{}\t{}\t{scope}\t{created}\tprevious token, until {}",
                p.name,
                p.role,
                previous.until.format("%Y-%m-%dT%H:%M:%SZ")
            );
        }
    }
    out
}
