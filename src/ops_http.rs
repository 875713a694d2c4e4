//! The operators' HTTP listener, on `METRICS_ADDR` when it is set:
//! `GET /metrics`, every metric in the Prometheus text format; `GET /`, a
//! read-only status page (tasks by status, the oldest wait, the latest
//! failures); `GET /task?id=ID`, one task's details. Plain HTML with its
//! style inline: no script, nothing fetched from elsewhere. It also
//! reads the queue (tasks by status, the oldest wait) from the database
//! every `METRICS_QUEUE_INTERVAL`, so a scrape never touches the database
//! and many instances cost one small query each per interval.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{Query, State, rejection::QueryRejection},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use tokio::{net::TcpListener, task::JoinSet};

use crate::{
    domain::{StoredStatus, TaskRecord},
    metrics::{StateLabels, StatusLabels, metrics},
    storage::{QueueStats, Store},
};

/// What the handlers share: the store, and the queue as last read (the
/// page shows that rather than counting every task on each view).
#[derive(Debug, Clone)]
struct Ops<S> {
    store: S,
    queue: Arc<Mutex<Option<(QueueStats, Instant)>>>,
}

/// The content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on `listener` and reads the queue every
/// `queue_interval`, both as tasks of `background` (aborted with it).
pub fn start<S: Store>(
    store: S,
    listener: TcpListener,
    queue_interval: Duration,
    background: &mut JoinSet<()>,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics on /metrics and the status page on /");
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the status page shows tasks' parameters and results without authentication: keep METRICS_ADDR on a private network");
        }
    }
    let ops = Ops {
        store,
        queue: Arc::default(),
    };
    let router = Router::new()
        .route("/metrics", get(metrics_text::<S>))
        .route("/", get(status_page::<S>))
        .route("/task", get(task_page::<S>))
        // The page shows task details: no script, no frames, no sniffing.
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(ops.clone());
    background.spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the metrics listener stopped");
        }
    });
    background.spawn(read_queue(ops, queue_interval));
}

/// Binds `addr` for [`start`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    response
}

async fn metrics_text<S: Store>(State(ops): State<Ops<S>>) -> impl IntoResponse {
    let metrics = metrics();
    // The pool's state is read at each scrape: it costs nothing.
    let (in_use, idle) = ops.store.connections();
    metrics
        .db_connections
        .get_or_create(&StateLabels { state: "in_use" })
        .set(i64::from(in_use));
    metrics
        .db_connections
        .get_or_create(&StateLabels { state: "idle" })
        .set(i64::from(idle));
    // The store counts its group commits; they are recorded here.
    for commits in ops.store.take_group_commits() {
        for _ in 0..commits.batches {
            metrics.observe_batch(commits.job, commits.size);
        }
    }
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], metrics.encode())
}

/// How many of the latest failures the status page lists.
const FAILURES_SHOWN: i64 = 20;

/// The status page: tasks by status, the oldest wait, the latest failures.
async fn status_page<S: Store>(State(ops): State<Ops<S>>) -> Response {
    let store = &ops.store;
    let read = *ops.queue.lock().unwrap_or_else(PoisonError::into_inner);
    let (stats, read_at) = match read {
        Some(read) => read,
        // Not read yet (the first interval has not passed): once now.
        None => match store.queue_stats().await {
            Ok(stats) => (stats, Instant::now()),
            Err(error) => return unavailable(&error),
        },
    };
    let failures = match store.recent_failures(FAILURES_SHOWN).await {
        Ok(failures) => failures,
        Err(error) => return unavailable(&error),
    };
    let mut body = String::from(
        "<h2>Tasks</h2>\n<table id=\"tasks\">\n<tr><th>Status</th><th>Tasks</th></tr>\n",
    );
    for (status, count) in StoredStatus::NAMES.into_iter().zip(stats.by_status) {
        body.push_str(&format!(
            "<tr id=\"status-{status}\"><td>{status}</td><td class=\"n\">{count}</td></tr>\n"
        ));
    }
    body.push_str(&format!(
        "</table>\n<p class=\"muted\">Read from the database {:.0} s ago.</p>\n",
        read_at.elapsed().as_secs_f64()
    ));
    body.push_str(&format!(
        "<p id=\"oldest\">Oldest queued task ready to lease: {}</p>\n",
        if stats.oldest_ready_seconds > 0.0 {
            format!("waiting for {:.1} s", stats.oldest_ready_seconds)
        } else {
            "none is waiting".to_owned()
        }
    ));
    body.push_str(
        "<form action=\"/task\" method=\"get\"><label>Task id <input name=\"id\" size=\"40\" \
         placeholder=\"a task's UUID\"></label> <button>Show</button></form>\n",
    );
    body.push_str("<h2>Latest failures</h2>\n");
    if failures.is_empty() {
        body.push_str("<p id=\"failures\">No task has failed.</p>\n");
    } else {
        body.push_str(
            "<table id=\"failures\">\n<tr><th>Failed at</th><th>Task</th><th>Agent</th>\
             <th>Action</th><th>Attempt</th><th>Error</th></tr>\n",
        );
        for task in &failures {
            body.push_str(&format!(
                "<tr><td>{}</td><td><a href=\"/task?id={id}\">{id}</a></td><td>{}</td><td>{}</td>\
                 <td class=\"n\">{}</td><td class=\"error\">{}</td></tr>\n",
                task.update_time.format("%Y-%m-%d %H:%M:%S UTC"),
                escape(&task.agent_id),
                escape(&task.action),
                task.attempt,
                escape(&task.error_message),
                id = task.task_id,
            ));
        }
        body.push_str("</table>\n");
    }
    page(StatusCode::OK, &store.describe(), &body)
}

/// The query of the task page.
#[derive(Debug, serde::Deserialize)]
struct TaskQuery {
    /// The task's id, as typed.
    id: Option<String>,
}

/// One task's details, by `?id=`. A query that cannot be read is answered
/// as a missing id: with the page that asks for one.
async fn task_page<S: Store>(
    State(ops): State<Ops<S>>,
    query: Result<Query<TaskQuery>, QueryRejection>,
) -> Response {
    let store = &ops.store;
    let id = query
        .ok()
        .and_then(|Query(query)| query.id)
        .unwrap_or_default();
    let id = id.trim();
    let Ok(task_id) = uuid::Uuid::parse_str(id) else {
        return page(
            StatusCode::BAD_REQUEST,
            &store.describe(),
            &format!(
                "<p class=\"error\">{} is not a task id: write a task's UUID.</p>",
                escape(&format!("{id:?}"))
            ),
        );
    };
    match store.get_task(task_id).await {
        Ok(Some(task)) => page(StatusCode::OK, &store.describe(), &task_details(&task)),
        Ok(None) => page(
            StatusCode::NOT_FOUND,
            &store.describe(),
            &format!("<p class=\"error\">No task {task_id}.</p>"),
        ),
        Err(error) => unavailable(&error),
    }
}

fn task_details(task: &TaskRecord) -> String {
    let status = StoredStatus::from_code(task.status.into()).map_or("unknown", StoredStatus::name);
    let json = |map: &serde_json::Map<String, serde_json::Value>| {
        escape(&serde_json::to_string_pretty(map).unwrap_or_default())
    };
    let mut rows = vec![
        ("Task", task.task_id.to_string()),
        ("Status", status.to_owned()),
        ("Agent", escape(&task.agent_id)),
        ("Action", escape(&task.action)),
        ("Attempt", task.attempt.to_string()),
        (
            "Created",
            task.create_time
                .format("%Y-%m-%d %H:%M:%S%.3f UTC")
                .to_string(),
        ),
        (
            "Updated",
            task.update_time
                .format("%Y-%m-%d %H:%M:%S%.3f UTC")
                .to_string(),
        ),
    ];
    if !task.error_message.is_empty() {
        rows.push(("Error", escape(&task.error_message)));
    }
    let mut body = format!("<h2>Task {}</h2>\n<table id=\"task\">\n", task.task_id);
    for (name, value) in rows {
        body.push_str(&format!(
            "<tr><th>{name}</th><td id=\"task-{}\">{value}</td></tr>\n",
            name.to_lowercase()
        ));
    }
    body.push_str("</table>\n<h3>Parameters</h3>\n<pre id=\"parameters\">");
    body.push_str(&json(&task.parameters));
    body.push_str("</pre>\n");
    if let Some(result) = &task.result {
        body.push_str("<h3>Result</h3>\n<pre id=\"result\">");
        body.push_str(&json(result));
        body.push_str("</pre>\n");
    }
    body.push_str("<p><a href=\"/\">Back to the status</a></p>\n");
    body
}

fn unavailable(error: &crate::storage::StorageError) -> Response {
    tracing::warn!(error = %crate::telemetry::chain(error), "the status page could not read the database");
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "",
        "<p class=\"error\">The database is unavailable; this page reloads by itself.</p>",
    )
}

/// A whole page around `body`; it reloads every 15 seconds.
fn page(status: StatusCode, store: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"refresh\" content=\"15\">\n<title>oncely status</title>\n<style>\n{STYLE}</style>\n\
         </head>\n<body>\n<h1><a href=\"/\">oncely</a></h1>\n<p class=\"muted\">{}</p>\n{body}\
         <p class=\"muted\">Read-only. Metrics at <a href=\"/metrics\">/metrics</a>.</p>\n</body>\n</html>\n",
        escape(store)
    );
    (status, Html(html)).into_response()
}

const STYLE: &str = "body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #1d1d1f; }
h1 a { color: inherit; text-decoration: none; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .8em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.error { color: #b00020; white-space: pre-wrap; }
.muted { color: #666; }
pre { background: #f5f5f7; padding: .8em; overflow: auto; }
";

/// `text` with the characters HTML gives a meaning escaped.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Reads the queue into the metrics every `interval`; a failed read keeps
/// the last figures and is logged.
async fn read_queue<S: Store>(ops: Ops<S>, interval: Duration) {
    // Every status's series exists, at zero, before the first read.
    for status in StoredStatus::NAMES {
        let _ = metrics().tasks.get_or_create(&StatusLabels { status });
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match ops.store.queue_stats().await {
            Ok(stats) => {
                *ops.queue.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((stats, Instant::now()));
                let metrics = metrics();
                for (status, count) in StoredStatus::NAMES.into_iter().zip(stats.by_status) {
                    metrics
                        .tasks
                        .get_or_create(&StatusLabels { status })
                        .set(count);
                }
                metrics.oldest_queued_age.set(stats.oldest_ready_seconds);
            }
            Err(error) => {
                tracing::warn!(error = %crate::telemetry::chain(&error), "could not read the queue for the metrics");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_never_markup() {
        assert_eq!(
            escape(r#"<script>alert('x')</script> & "q""#),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }
}
