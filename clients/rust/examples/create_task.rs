//! An agent's side effect, made safe: create a task with a key generated
//! once for this logical call, retrying transient failures with that key.
//!
//! Run against a running server (see the README):
//!
//! ```sh
//! cargo run -p oncely-client --example create_task -- http://127.0.0.1:50051
//! ```
//!
//! On a server with API keys, set `ONCELY_API_KEY` to a key of the `agent`
//! role for `example-agent` (or of the `admin` role).

use std::process::ExitCode;

use tonic::Code;

use oncely_client::{ClientError, OncelyClient, json, proto::tasks_v1::CreateTaskRequest};

#[tokio::main]
async fn main() -> ExitCode {
    let server = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    // ONCELY_API_KEY, if set, is read here and nowhere else.
    let client = match OncelyClient::connect(server).and_then(OncelyClient::with_api_key_from_env) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let request = CreateTaskRequest {
        agent_id: "example-agent".into(),
        action: "send_email".into(),
        // A literal object, so the conversion cannot fail.
        parameters: json::to_struct(
            serde_json::json!({"to": "ada@example.com", "subject": "hello"}),
        )
        .ok(),
    };

    // One logical call: the client generates the key and reuses it on every
    // retry of this call.
    let created = match client.create_task(request.clone()).await {
        Ok(created) => created,
        Err(ClientError::Rejected(status))
            if matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ) =>
        {
            eprintln!(
                "the API key was refused (set ONCELY_API_KEY): {}",
                status.message()
            );
            return ExitCode::FAILURE;
        }
        Err(ClientError::Rejected(status)) => {
            eprintln!("the request must change: {}", status.message());
            return ExitCode::FAILURE;
        }
        Err(error) => {
            eprintln!("not created, safe to retry later with the same key: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "created task {} with key {} in {} attempt(s)",
        created.task.task_id, created.key, created.attempts
    );

    // Asking again with the same key (say, after the agent itself crashed)
    // returns the same task, marked as a replay.
    match client.create_task_with_key(&created.key, request).await {
        Ok(again) if again.task == created.task && again.replayed => {
            println!("asked again with the same key: same task, replayed");
            ExitCode::SUCCESS
        }
        Ok(again) => {
            eprintln!("unexpected answer: {again:?}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}
