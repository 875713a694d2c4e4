//! The status page on METRICS_ADDR, as an operator sees it: rendered by a
//! real headless browser (Chromium), not only fetched.

use std::{path::PathBuf, process::Command, time::Duration};

use oncely::proto::tasks_v1::{
    FailTaskRequest, task_service_client::TaskServiceClient,
    worker_service_client::WorkerServiceClient,
};
use tonic::transport::Endpoint;

use crate::support::{
    Backend, BinaryServer, TestDb, email_request, eventually, keyed, lease_one, new_key, request,
};

/// The Chromium to render with: `CHROMIUM`, or the first on the PATH.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return path.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Some(found) = std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
        {
            return found;
        }
    }
    panic!(
        "the status page test needs a headless Chromium: `apt-get install chromium` \
         (Debian), or set CHROMIUM to a Chromium or Chrome binary"
    );
}

/// The page at `url` as Chromium renders it (its DOM, serialized).
fn render(url: &str) -> String {
    let profile = tempfile::tempdir().expect("a profile folder");
    // Never more than a minute, however Chromium fares.
    let output = Command::new("timeout")
        .arg("60")
        .arg(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-extensions",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .expect("run Chromium");
    assert!(
        output.status.success(),
        "Chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn the_status_page_shows_tasks_and_failures_in_a_browser(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (server, page) = BinaryServer::start_with_metrics(&db).await;
    let channel = Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut tasks = TaskServiceClient::new(channel.clone());
    let failing = tasks
        .create_task(keyed(
            Some(&new_key()),
            request(
                "agent-<9>",
                "charge_card",
                serde_json::json!({"amount": 12}),
            ),
        ))
        .await
        .expect("create")
        .into_inner();
    let mut workers = WorkerServiceClient::new(channel);
    let lease = lease_one(&mut workers).await;
    workers
        .fail_task(FailTaskRequest {
            task_id: failing.task_id.clone(),
            lease_token: lease.lease_token,
            error_message: "the card was declined: <b>insufficient</b> funds & more".into(),
            permanent: true,
            retry_after: None,
        })
        .await
        .expect("fail");
    let queued = tasks
        .create_task(keyed(Some(&new_key()), email_request()))
        .await
        .expect("create")
        .into_inner();

    // The page shows the queue as last read, every 100 ms here.
    let metrics = format!("http://{page}/metrics");
    eventually(Duration::from_secs(30), "the queue read", || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        (text.contains("oncely_tasks{status=\"queued\"} 1")
            && text.contains("oncely_tasks{status=\"failed\"} 1"))
        .then_some(())
    })
    .await;
    let status = tokio::task::spawn_blocking({
        let url = format!("http://{page}/");
        move || render(&url)
    })
    .await
    .expect("render");
    assert!(status.contains("<title>oncely status</title>"), "{status}");
    let row = |status_name: &str| {
        let start = status
            .find(&format!("id=\"status-{status_name}\""))
            .unwrap_or_else(|| panic!("no row for {status_name}: {status}"));
        status[start..]
            .split("</tr>")
            .next()
            .unwrap_or("")
            .to_owned()
    };
    assert!(row("queued").contains(">1</td>"), "{}", row("queued"));
    assert!(row("failed").contains(">1</td>"), "{}", row("failed"));
    assert!(row("succeeded").contains(">0</td>"), "{}", row("succeeded"));
    // The failure, its message shown as text: what a worker writes is never
    // taken for markup.
    assert!(status.contains(&failing.task_id), "{status}");
    assert!(
        status.contains("the card was declined: &lt;b&gt;insufficient&lt;/b&gt; funds &amp; more"),
        "{status}"
    );
    assert!(!status.contains("<b>insufficient</b>"), "{status}");
    assert!(status.contains("agent-&lt;9&gt;"), "{status}");

    let details = tokio::task::spawn_blocking({
        let url = format!("http://{page}/task?id={}", queued.task_id);
        move || render(&url)
    })
    .await
    .expect("render");
    assert!(
        details.contains(&format!("Task {}", queued.task_id)),
        "{details}"
    );
    assert!(
        details.contains("<td id=\"task-status\">queued</td>"),
        "{details}"
    );
    assert!(details.contains("ada@example.com"), "{details}");
    drop(server);
}

conformance!(the_status_page_shows_tasks_and_failures_in_a_browser);
