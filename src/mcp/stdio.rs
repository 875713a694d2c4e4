//! `oncely mcp`: an MCP server on standard input and output, for desktop
//! agents that spawn their tool servers, calling a running oncely over
//! gRPC as one API key. Standard output carries JSON-RPC only; logs go to
//! standard error.

use std::path::PathBuf;

use clap::Args;
use oncely_client::TlsOptions;
use rmcp::ServiceExt;
use tonic::metadata::AsciiMetadataValue;

use super::{Caller, OncelyMcp, Tasks};
use crate::cleanup_cmd::ApiKey;

/// The mcp subcommand's flags.
#[derive(Debug, Clone, Args)]
pub struct McpArgs {
    /// The oncely server to call, such as http://127.0.0.1:50051 or
    /// https://oncely.example.com.
    #[arg(long, env = "ONCELY_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// An agent API key, when the server requires keys.
    #[arg(long, env = "ONCELY_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,
    /// A PEM CA certificate to trust for an https:// server, besides the
    /// system's roots.
    #[arg(long, env = "ONCELY_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate, for a server that asks for one (mTLS).
    #[arg(long, env = "ONCELY_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's PEM private key.
    #[arg(long, env = "ONCELY_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// The most attempts of a call that fails transiently (the server
    /// unreachable, restarting, failing over), each with the same key.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempts: u32,
}

/// Why `oncely mcp` stopped.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// A file named by a flag cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server address or TLS options cannot be used.
    #[error("cannot call {server}: {source}")]
    Client {
        /// The address.
        server: String,
        /// The cause.
        #[source]
        source: oncely_client::ClientError,
    },
    /// The API key cannot be sent as metadata.
    #[error("the API key is not valid metadata; pass the token `oncely keys create` printed")]
    ApiKey,
    /// The MCP client did not complete the handshake.
    #[error("the MCP session could not start: {0}")]
    Start(String),
    /// The MCP session ended with an error.
    #[error("the MCP session failed: {0}")]
    Session(String),
}

/// Serves MCP on stdio until the client closes standard input.
pub async fn run(args: &McpArgs) -> Result<(), McpError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| McpError::Read {
            path: path.clone(),
            source,
        })
    };
    let tls = TlsOptions {
        ca_pem: args.ca_file.as_ref().map(read).transpose()?,
        identity_pem: match (&args.client_cert, &args.client_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        },
    };
    let server = if args.server.contains("://") {
        args.server.clone()
    } else {
        format!("http://{}", args.server)
    };
    // Connects on first use and reconnects by itself.
    let channel = oncely_client::channel(server.clone(), &tls)
        .map_err(|source| McpError::Client { server, source })?;
    // An empty key (`"ONCELY_API_KEY": ""` in a client's config) is none.
    let authorization = args
        .api_key
        .as_ref()
        .filter(|key| !key.token().is_empty())
        .map(|key| AsciiMetadataValue::try_from(format!("Bearer {}", key.token())))
        .transpose()
        .map_err(|_| McpError::ApiKey)?
        .map(|mut value| {
            value.set_sensitive(true);
            value
        });
    let caller = Caller {
        authorization,
        ..Caller::default()
    };
    let mcp = OncelyMcp::new(Tasks::remote(channel, args.attempts), caller);
    let running = mcp
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|error| McpError::Start(error.to_string()))?;
    running
        .waiting()
        .await
        .map_err(|error| McpError::Session(error.to_string()))?;
    Ok(())
}
