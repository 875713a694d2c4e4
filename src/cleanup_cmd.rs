//! `oncely cleanup`: asks a running server to delete expired idempotency
//! records, prints one summary line, and exits non-zero on failure.

use std::time::Duration;

use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use oncely_client::proto::tasks_v1::{CleanupRequest, admin_client::AdminClient};

/// The cleanup subcommand's flags.
#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// The server to call.
    #[arg(long, env = "ONCELY_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Delete records older than this, such as 24h; the server's retention
    /// when unset.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
    /// Give up after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// A PEM CA certificate to trust for an https:// server, besides the
    /// system's roots.
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// An admin API key, when the server requires keys.
    #[arg(long, env = "ONCELY_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,
}

/// An API key given on the command line; its `Debug` form hides it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// The token.
    pub fn token(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ApiKey {
    type Err = std::convert::Infallible;

    fn from_str(token: &str) -> Result<Self, Self::Err> {
        Ok(Self(token.to_owned()))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// Why cleanup failed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The server address is not a valid URI.
    #[error("invalid server address {0:?}")]
    Address(String),
    /// The server could not be reached.
    #[error("cannot connect to {server}")]
    Connect {
        /// The address.
        server: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server answered with an error.
    #[error("the server refused: {code:?}: {message}", code = .0.code(), message = .0.message())]
    Rpc(tonic::Status),
    /// The TLS settings cannot be used.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// The API key cannot be sent as metadata.
    #[error("the API key is not valid metadata; pass the token `oncely keys create` printed")]
    ApiKey,
    /// No answer within the timeout.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// Runs cleanup and returns how many records were deleted.
pub async fn run(args: &CleanupArgs) -> Result<i64, CleanupError> {
    let server = if args.server.contains("://") {
        args.server.clone()
    } else {
        format!("http://{}", args.server)
    };
    let mut endpoint = Endpoint::from_shared(server.clone())
        .map_err(|_| CleanupError::Address(args.server.clone()))?
        .connect_timeout(args.timeout.min(Duration::from_secs(10)))
        .timeout(args.timeout);
    // An https:// server is called over TLS, never in plaintext.
    if server.to_ascii_lowercase().starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(path) = &args.ca_file {
            let ca = std::fs::read(path)
                .map_err(|e| CleanupError::Tls(format!("cannot read {}: {e}", path.display())))?;
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| CleanupError::Tls(e.to_string()))?;
    } else if args.ca_file.is_some() {
        return Err(CleanupError::Tls(
            "--ca-file is for an https:// server".into(),
        ));
    }
    let call = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| CleanupError::Connect {
                server: server.clone(),
                source,
            })?;
        let mut request = tonic::Request::new(CleanupRequest {
            older_than: args.older_than.map(|d| prost_types::Duration {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: d.subsec_nanos() as i32,
            }),
        });
        if let Some(ApiKey(key)) = &args.api_key {
            let value = format!("Bearer {key}")
                .parse()
                .map_err(|_| CleanupError::ApiKey)?;
            request.metadata_mut().insert("authorization", value);
        }
        AdminClient::new(channel)
            .cleanup(request)
            .await
            .map(|response| response.into_inner().deleted)
            .map_err(CleanupError::Rpc)
    };
    tokio::time::timeout(args.timeout, call)
        .await
        .map_err(|_| CleanupError::Timeout(args.timeout))?
}
