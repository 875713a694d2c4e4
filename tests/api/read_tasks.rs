//! GetTask and ListTasks.

use crate::support::Backend;

use oncely::proto::tasks_v1::{GetTaskRequest, ListTasksRequest, ListTasksResponse, Task};
use serde_json::json;
use tonic::Code;

use crate::support::{
    TestApp, TestDb, assert_invalid, assert_status, eventually, new_key, request, test_settings,
    violated_fields,
};

async fn create_tasks(app: &TestApp, agent: &str, count: usize) -> Vec<Task> {
    let mut tasks = Vec::new();
    for i in 0..count {
        let response = app
            .create(Some(&new_key()), request(agent, "step", json!({"i": i})))
            .await
            .expect("create");
        tasks.push(response.into_inner());
    }
    tasks
}

async fn get(app: &TestApp, task_id: &str) -> Task {
    app.tasks
        .clone()
        .get_task(GetTaskRequest {
            task_id: task_id.into(),
        })
        .await
        .expect("get")
        .into_inner()
}

/// A task's parameters as they crossed the wire: compared to the bit.
fn encoded_parameters(task: &Task) -> Vec<u8> {
    prost::Message::encode_to_vec(task.parameters.as_ref().expect("parameters"))
}

async fn list(
    app: &TestApp,
    agent: &str,
    page_size: i32,
    page_token: &str,
) -> Result<ListTasksResponse, tonic::Status> {
    app.tasks
        .clone()
        .list_tasks(ListTasksRequest {
            agent_id: agent.into(),
            page_size,
            page_token: page_token.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Canonical JSON has no negative zero: the task stores `0`. The first
/// response says what is stored, so that it, a replay and every later read
/// agree to the bit.
async fn a_negative_zero_reads_back_as_the_created_task_said(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let parameters = json!({"z": -0.0, "list": [-0.0, 1.5], "nested": {"n": -0.0}});
    let created = app
        .create(Some(&key), request("agent-1", "step", parameters.clone()))
        .await
        .expect("create")
        .into_inner();
    let replayed = app
        .create(Some(&key), request("agent-1", "step", parameters))
        .await
        .expect("replay")
        .into_inner();
    let got = get(&app, &created.task_id).await;

    assert_eq!(
        encoded_parameters(&created),
        encoded_parameters(&got),
        "created and read agree to the bit"
    );
    assert_eq!(
        encoded_parameters(&replayed),
        encoded_parameters(&got),
        "replayed and read agree to the bit"
    );
    let z = created.parameters.as_ref().expect("parameters").fields["z"].clone();
    assert_eq!(
        z.kind,
        Some(prost_types::value::Kind::NumberValue(0.0)),
        "a plain zero"
    );
    let Some(prost_types::value::Kind::NumberValue(z)) = z.kind else {
        unreachable!()
    };
    assert!(z.is_sign_positive(), "no negative zero");
}

/// Numbers are stored as canonical JSON text; read back, each is the same
/// double the request sent, to the bit (found by tests/properties.rs:
/// serde_json's default parser is off by an ulp for some numbers).
async fn numbers_read_back_exactly_as_sent(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let numbers = [
        1.1840873656772523e296,
        2.2250738585072014e-308,
        0.1,
        9007199254740993.0,
    ];
    let parameters = serde_json::Value::Array(numbers.iter().map(|&x| json!(x)).collect());
    let created = app
        .create(
            Some(&new_key()),
            request("agent-1", "step", json!({"x": parameters})),
        )
        .await
        .expect("create")
        .into_inner();
    let got = get(&app, &created.task_id).await;

    assert_eq!(
        encoded_parameters(&got),
        encoded_parameters(&created),
        "read back to the bit"
    );
}

async fn get_task_returns_the_created_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let created = create_tasks(&app, "agent-1", 1).await.remove(0);

    let got = app
        .tasks
        .clone()
        .get_task(GetTaskRequest {
            task_id: created.task_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();

    assert_eq!(got, created);
}

async fn get_task_explains_unknown_and_malformed_ids(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    assert_status(
        app.tasks
            .clone()
            .get_task(GetTaskRequest {
                task_id: uuid::Uuid::new_v4().to_string(),
            })
            .await,
        Code::NotFound,
        None,
    );
    let status = assert_invalid(
        app.tasks
            .clone()
            .get_task(GetTaskRequest {
                task_id: "42".into(),
            })
            .await,
        "INVALID_REQUEST",
    );
    assert_eq!(violated_fields(&status), ["task_id"]);
}

async fn list_tasks_pages_one_agents_tasks_in_creation_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let mine = create_tasks(&app, "agent-1", 7).await;
    create_tasks(&app, "agent-2", 2).await;

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(&app, "agent-1", 3, &token).await.expect("page");
        pages += 1;
        assert!(page.tasks.len() <= 3);
        seen.extend(page.tasks);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }

    assert_eq!(pages, 3);
    assert_eq!(seen, mine);
}

/// A task that commits after tasks numbered after it must not fall behind a
/// page already read: creates commit in the order of their numbers, so a
/// page never holds a task while an earlier-numbered one is still to come.
async fn paging_never_skips_a_task_that_commits_late(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    // Whatever waits for the late create waits far longer than the test.
    settings.database.in_flight_wait = std::time::Duration::from_secs(60);
    let app = TestApp::spawn_with(settings).await;
    create_tasks(&app, "agent-1", 3).await;
    // Another instance's create, in flight: its task is numbered, not yet
    // committed.
    let (late, _) = db
        .begin_in_flight(
            &new_key(),
            &request("agent-1", "step", json!({"late": true})),
        )
        .await;
    let after: Vec<_> = (0..2)
        .map(|i| app.spawn_create(&new_key(), request("agent-1", "step", json!({"after": i}))))
        .collect();
    if backend == Backend::Postgres {
        // Numbered after it, they commit without waiting for it. (On
        // SQLite the in-flight create holds the one writer: they wait for
        // it, and are numbered after it whenever they come.)
        eventually(
            std::time::Duration::from_secs(30),
            "the later creates to commit",
            || async { (db.count("tasks").await == 5).then_some(()) },
        )
        .await;
    }

    // A client pages through while that create is still in flight (the
    // store may make the read wait for it).
    let mut tasks = app.tasks.clone();
    let first = tokio::spawn(async move {
        tasks
            .list_tasks(ListTasksRequest {
                agent_id: "agent-1".into(),
                page_size: 4,
                page_token: String::new(),
            })
            .await
    });
    eventually(
        std::time::Duration::from_secs(30),
        "the page to be read, or to wait for the late create",
        || async {
            let waits = backend == Backend::Postgres && db.sessions_waiting_for_a_lock().await > 0;
            (first.is_finished() || waits).then_some(())
        },
    )
    .await;
    late.commit().await;
    let first = first.await.expect("join").expect("a page").into_inner();
    for call in after {
        call.await.expect("join").expect("created");
    }
    let mut seen = first.tasks;
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let page = list(&app, "agent-1", 4, &token).await.expect("a page");
        seen.extend(page.tasks);
        token = page.next_page_token;
    }

    // Every task up to the last one the client saw, it saw.
    let all = list(&app, "agent-1", 100, "").await.expect("all").tasks;
    assert_eq!(all.len(), 6);
    let last = seen.last().expect("a task was seen");
    let reached = all
        .iter()
        .position(|t| t.task_id == last.task_id)
        .expect("the last task seen exists");
    let ids = |tasks: &[Task]| tasks.iter().map(|t| t.task_id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&seen),
        ids(&all[..=reached]),
        "the pages skipped a task that committed late"
    );
}

async fn list_tasks_defaults_to_fifty_and_clamps_to_a_thousand(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    create_tasks(&app, "agent-1", 51).await;

    let default_page = list(&app, "agent-1", 0, "").await.expect("default page");
    let clamped = list(&app, "agent-1", 5000, "").await.expect("clamped page");
    let exact = list(&app, "agent-1", 51, "").await.expect("exact page");

    assert_eq!(default_page.tasks.len(), 50);
    assert!(!default_page.next_page_token.is_empty());
    assert_eq!(clamped.tasks.len(), 51);
    assert!(clamped.next_page_token.is_empty());
    assert!(exact.next_page_token.is_empty());
    let unknown = list(&app, "nobody", 0, "").await.expect("empty");
    assert!(unknown.tasks.is_empty() && unknown.next_page_token.is_empty());
}

async fn list_tasks_clamps_the_page_size_to_a_thousand(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    db.insert_tasks("bulk", 1005).await;

    let first = list(&app, "bulk", 5000, "").await.expect("first page");
    let rest = list(&app, "bulk", 5000, &first.next_page_token)
        .await
        .expect("second page");

    assert_eq!(first.tasks.len(), 1000);
    assert!(!first.next_page_token.is_empty());
    assert_eq!(rest.tasks.len(), 5);
    assert!(rest.next_page_token.is_empty());
}

#[tokio::test]
async fn a_lock_wait_outside_a_claim_is_unavailable_not_in_progress() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut settings = crate::support::test_settings(&db.url);
    settings.database.in_flight_wait = std::time::Duration::from_millis(300);
    let app = TestApp::spawn_with(settings).await;
    let lock = db.lock_tasks_table().await;

    let result = app
        .tasks
        .clone()
        .get_task(GetTaskRequest {
            task_id: uuid::Uuid::new_v4().to_string(),
        })
        .await;

    assert_status(result, Code::Unavailable, Some("DATABASE_UNAVAILABLE"));
    lock.rollback().await.expect("rollback");
}

async fn list_tasks_refuses_bad_arguments_with_the_field_named(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    for (agent, size, token, field) in [
        ("", 10, "", "agent_id"),
        ("agent-1", -1, "", "page_size"),
        ("agent-1", 10, "garbage!", "page_token"),
        ("agent\0", 10, "", "agent_id"),
    ] {
        let status = assert_invalid(list(&app, agent, size, token).await, "INVALID_REQUEST");
        assert_eq!(violated_fields(&status), [field]);
    }
}

async fn a_huge_malformed_task_id_is_echoed_only_as_a_short_prefix(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let task_id = "\u{7}".repeat(500_000);

    let status = assert_invalid(
        app.tasks.clone().get_task(GetTaskRequest { task_id }).await,
        "INVALID_REQUEST",
    );

    assert_eq!(violated_fields(&status), ["task_id"]);
    assert!(status.message().len() < 500, "{}", status.message());
    assert!(
        status.message().contains("500000 bytes"),
        "{}",
        status.message()
    );
}

async fn a_page_of_large_tasks_ends_early_and_its_token_continues(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let big = "x".repeat(60 * 1024);
    let mut created = Vec::new();
    for i in 0..40 {
        let response = app
            .create(
                Some(&new_key()),
                request("big", "step", json!({"i": i, "body": big})),
            )
            .await
            .expect("create");
        created.push(response.into_inner().task_id);
    }

    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(&app, "big", 1000, &token).await.expect("page");
        pages.push(page.tasks.len());
        let bytes: usize = page.tasks.iter().map(prost::Message::encoded_len).sum();
        assert!(bytes < 3 * 1024 * 1024, "a page of {bytes} bytes");
        token = page.next_page_token;
        let ids: Vec<String> = page.tasks.into_iter().map(|t| t.task_id).collect();
        created.retain(|id| !ids.contains(id));
        if token.is_empty() {
            break;
        }
    }

    assert!(pages[0] < 40, "the first page ended early: {pages:?}");
    assert!(pages.len() >= 2);
    assert!(created.is_empty(), "tasks skipped: {created:?}");
}

/// Numbers cost 2 bytes each in JSON and 11 in the protobuf answer: a page
/// bounded by JSON bytes alone would overflow a client's 4 MiB limit.
async fn a_page_is_bounded_in_the_bytes_sent_not_the_bytes_stored(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let ones = vec![1; 30_000];
    let mut created = Vec::new();
    for i in 0..40 {
        let response = app
            .create(
                Some(&new_key()),
                request("dense", "step", json!({"i": i, "n": ones})),
            )
            .await
            .expect("create");
        created.push(response.into_inner().task_id);
    }

    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(&app, "dense", 1000, &token)
            .await
            .expect("a page the client can decode");
        pages += 1;
        let bytes = prost::Message::encoded_len(&page);
        assert!(bytes <= 2 * 1024 * 1024, "a page of {bytes} bytes");
        token = page.next_page_token;
        let ids: Vec<String> = page.tasks.into_iter().map(|t| t.task_id).collect();
        created.retain(|id| !ids.contains(id));
        if token.is_empty() {
            break;
        }
    }

    assert!(pages >= 6, "{pages} pages");
    assert!(created.is_empty(), "tasks skipped: {created:?}");
}

conformance!(
    numbers_read_back_exactly_as_sent,
    a_negative_zero_reads_back_as_the_created_task_said,
    a_page_is_bounded_in_the_bytes_sent_not_the_bytes_stored,
    a_huge_malformed_task_id_is_echoed_only_as_a_short_prefix,
    a_page_of_large_tasks_ends_early_and_its_token_continues,
    get_task_returns_the_created_task,
    get_task_explains_unknown_and_malformed_ids,
    list_tasks_pages_one_agents_tasks_in_creation_order,
    paging_never_skips_a_task_that_commits_late,
    list_tasks_defaults_to_fifty_and_clamps_to_a_thousand,
    list_tasks_clamps_the_page_size_to_a_thousand,
    list_tasks_refuses_bad_arguments_with_the_field_named,
);
