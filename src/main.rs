use std::process::ExitCode;

use clap::Parser;
use oncely::{
    Settings, api_keys_cmd, cleanup_cmd,
    config::{Cli, Command},
    telemetry::chain,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The stdio MCP bridge runs inside a desktop client, whose log it
    // shares: warnings only, unless RUST_LOG says otherwise.
    let default_filter = match cli.command {
        Some(Command::Mcp(_)) => "warn",
        _ => "info",
    };
    let telemetry = oncely::telemetry::init_with(cli.serve.log_format, default_filter);
    let code = match cli.command {
        None | Some(Command::Serve) => match oncely::run(cli.serve.into()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %chain(&error), "oncely stopped");
                ExitCode::FAILURE
            }
        },
        Some(Command::Keys(args)) => {
            let settings = Settings::from(cli.serve);
            match api_keys_cmd::run(&settings.database, &args).await {
                Ok(printed) => {
                    print!("{}", printed.stdout);
                    eprint!("{}", printed.stderr);
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("oncely keys: failed: {}", chain(&error));
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Mcp(args)) => match oncely::mcp::run_stdio(&args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("oncely mcp: {}", chain(&error));
                ExitCode::FAILURE
            }
        },
        Some(Command::Cleanup(args)) => match cleanup_cmd::run(&args).await {
            Ok(deleted) => {
                let scope = match args.older_than {
                    Some(d) => format!("older than {}", humantime::format_duration(d)),
                    None => "older than the server's retention".to_owned(),
                };
                println!("oncely cleanup: deleted {deleted} idempotency records {scope}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("oncely cleanup: failed: {}", chain(&error));
                ExitCode::FAILURE
            }
        },
    };
    telemetry.shutdown().await;
    code
}
