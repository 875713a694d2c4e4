//! A worker that performs `send_email` tasks: it "sends" each email by
//! appending a line `<task_id> <to>` to a file, once per task however often
//! the task is delivered, and stops gracefully on Ctrl-C.
//!
//! Run against a running server (see the README), then create tasks with
//! the `agent_wait` or `create_task` example:
//!
//! ```sh
//! cargo run -p oncely-client --example worker -- http://127.0.0.1:50051 sent.txt
//! ```
//!
//! The file defaults to `./sent-emails.txt`; set `RUST_LOG=debug` for more.
//! On a server with API keys, set `ONCELY_API_KEY` to a key of the `worker`
//! role (for the `send_email` action, or for any) or of the `admin` role.

use std::{
    fs::OpenOptions,
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use oncely_client::{
    TaskContext, TaskError, Worker, WorkerOptions, api_key_from_env, json, proto::tasks_v1::Task,
};
use serde_json::{Value, json};

/// The "mail provider": a file of sent emails, one line per task.
#[derive(Debug)]
struct Outbox {
    path: PathBuf,
    /// Makes check-then-append one step within this process. A real mail
    /// API does the same on its side, keyed by the idempotency key.
    lock: Mutex<()>,
}

impl Outbox {
    /// Appends `<key> <to>` unless a line for `key` is there already.
    /// Returns whether it appended: false means this is a re-delivery of a
    /// task whose email went out before.
    fn send_once(&self, key: &str, to: &str) -> std::io::Result<bool> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        for line in BufReader::new(&file).lines() {
            if line?.split(' ').next() == Some(key) {
                return Ok(false);
            }
        }
        writeln!(file, "{key} {to}")?;
        file.sync_data()?;
        Ok(true)
    }
}

/// The handler: runs once per delivery of a `send_email` task.
async fn send_email(outbox: Arc<Outbox>, task: Task, ctx: TaskContext) -> Result<Value, TaskError> {
    let parameters = task
        .parameters
        .as_ref()
        .map(json::from_struct)
        .unwrap_or_default();
    let to = match parameters.get("to").and_then(Value::as_str) {
        Some(to) if !to.is_empty() && !to.contains(char::is_whitespace) => to.to_owned(),
        // Retrying cannot fix the parameters: end the task FAILED now.
        _ => {
            return Err(TaskError::permanent(
                "parameters.to must be a non-empty address",
            ));
        }
    };

    // Stand-in for the provider's latency; stop early if the task was
    // cancelled or the lease lost (what we return then is not reported).
    tokio::select! {
        reason = ctx.cancelled() => return Err(TaskError::retryable(format!("stopped: {reason:?}"))),
        () = tokio::time::sleep(Duration::from_millis(200)) => {}
    }

    // The side effect, keyed by the task id: a re-delivered task (a worker
    // crashed before CompleteTask) finds its line and sends nothing.
    let key = ctx.idempotency_key().to_owned();
    let address = to.clone();
    let sent_now = tokio::task::spawn_blocking(move || outbox.send_once(&key, &address)).await??;
    Ok(json!({"to": to, "sent_now": sent_now, "attempt": ctx.attempt()}))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let server = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    let path = args
        .next()
        .unwrap_or_else(|| "./sent-emails.txt".to_owned());

    let options = WorkerOptions {
        actions: vec!["send_email".into()],
        api_key: api_key_from_env(),
        ..WorkerOptions::default()
    };
    let worker = match Worker::connect(server, options) {
        Ok(worker) => worker,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let outbox = Arc::new(Outbox {
        path: PathBuf::from(path),
        lock: Mutex::new(()),
    });
    let handler = move |task, ctx| send_email(Arc::clone(&outbox), task, ctx);
    let shutdown = async {
        // If the signal cannot be listened for, run until killed.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    match worker.run(handler, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}
