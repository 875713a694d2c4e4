//! Why the server could not start, or stopped with an error.

use crate::storage::StorageError;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be prepared.
    #[error("cannot prepare the database at {url}")]
    Database {
        /// The redacted URL.
        url: String,
        /// The cause.
        #[source]
        source: StorageError,
    },
    /// The database stayed unavailable for all of DB_STARTUP_TIMEOUT.
    #[error(
        "the database at {url} did not become available within {waited:?} (DB_STARTUP_TIMEOUT)"
    )]
    DatabaseTimeout {
        /// The redacted URL.
        url: String,
        /// How long startup waited.
        waited: std::time::Duration,
        /// The last attempt's error.
        #[source]
        source: StorageError,
    },
    /// No API key exists and the address is not a loopback one.
    #[error(
        "refusing to serve on {addr} without API keys: anyone who can reach it could call every method. Create a key first (`oncely keys create --name admin --role admin`, then agent and worker keys), or listen on a loopback address, or set AUTH=disabled if the network is trusted"
    )]
    Unprotected {
        /// The address.
        addr: std::net::SocketAddr,
    },
    /// A TLS file could not be read.
    #[error("cannot read the TLS file {path}")]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The API keys could not be read.
    #[error("cannot read the API keys")]
    Keys(#[source] StorageError),
    /// When records of the earlier key scope were last written could not
    /// be read (or, with LEGACY_KEY_SCOPE=dual, noted).
    #[error("cannot read when records of the earlier, per-API-key scope were last written")]
    LegacyRecords(#[source] StorageError),
    /// The database URL names no known store.
    #[error("DATABASE_URL {0:?} names no store oncely knows; use postgres://... or sqlite://PATH")]
    UnknownDatabase(String),
    /// Reflection could not load the descriptors.
    #[error("cannot build server reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("the gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}
