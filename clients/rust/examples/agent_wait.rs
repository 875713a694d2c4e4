//! An agent that creates a `send_email` task and waits for a worker to
//! perform it, printing the result.
//!
//! Run against a running server with the `worker` example running too (see
//! the README):
//!
//! ```sh
//! cargo run -p oncely-client --example agent_wait -- http://127.0.0.1:50051 ada@example.com
//! ```
//!
//! On a server with API keys, set `ONCELY_API_KEY` to a key of the `agent`
//! role for `example-agent` (or of the `admin` role).

use std::{process::ExitCode, time::Duration};

use oncely_client::{
    OncelyClient, is_finished, json,
    proto::tasks_v1::{CreateTaskRequest, TaskStatus},
};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let server = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    let to = args.next().unwrap_or_else(|| "ada@example.com".to_owned());
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
        parameters: json::to_struct(serde_json::json!({"to": to, "subject": "hello"})).ok(),
    };
    let created = match client.create_task(request).await {
        Ok(created) => created,
        Err(error) => {
            eprintln!("not created: {error}");
            return ExitCode::FAILURE;
        }
    };
    let task_id = created.task.task_id;
    println!("created task {task_id}; waiting for a worker");

    // One call, however long: wait_task repeats the server's long poll.
    let task = match client.wait_task(&task_id, Duration::from_secs(120)).await {
        Ok(task) => task,
        Err(error) => {
            eprintln!("waiting failed: {error}");
            return ExitCode::FAILURE;
        }
    };
    if !is_finished(&task) {
        // Still queued or running: nobody works on send_email, or it is slow.
        println!(
            "not finished after 2 minutes: {:?}; cancelling",
            task.status()
        );
        if let Err(error) = client.cancel_task(&task_id).await {
            eprintln!("cancelling failed: {error}");
        }
        return ExitCode::FAILURE;
    }
    match task.status() {
        TaskStatus::Succeeded => {
            let result = task
                .result
                .as_ref()
                .map(json::from_struct)
                .unwrap_or_default();
            println!(
                "succeeded after {} attempt(s): {}",
                task.attempt,
                serde_json::Value::Object(result)
            );
            ExitCode::SUCCESS
        }
        status => {
            println!("{status:?}: {}", task.error_message);
            ExitCode::FAILURE
        }
    }
}
