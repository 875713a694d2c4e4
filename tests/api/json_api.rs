//! The JSON API over real HTTP/1.1, against the real binary: the same
//! contract as gRPC (created, replayed byte for byte, refused), across the
//! two surfaces, with problems for every refusal and nothing stored for a
//! hostile body.

use crate::support::Backend;

use std::time::Duration;

use serde_json::{Value, json};
use tonic::Code;

use crate::support::{
    BinaryApp, PgProxy, TestApp, TestDb, assert_status, email_request, eventually, new_key,
    replayed, rpc, scrape_until, test_settings, value,
};

/// An HTTP answer, read whole.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    /// The body as JSON.
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// A header's value.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a problem (RFC 9457) with `status` and `reason`.
    #[track_caller]
    fn assert_problem(&self, status: u16, reason: Option<&str>) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let problem = self.json();
        assert_eq!(problem["status"], status);
        assert!(
            !problem["detail"].as_str().unwrap_or_default().is_empty(),
            "{problem}"
        );
        if let Some(reason) = reason {
            assert_eq!(problem["reason"], reason, "{problem}");
            assert_eq!(problem["type"], format!("urn:oncely:problem:{reason}"));
        }
        problem
    }
}

/// Sends `method` to `path` on `app`'s port, with `headers` and `body`.
async fn call(
    app: &BinaryApp,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    call_at(&app.server.url(), method, path, headers, body).await
}

/// [`call`] to the server at `base` (`http://host:port`).
async fn call_at(
    base: &str,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    let url = format!("{base}{path}");
    let mut request = reqwest::Client::new().request(method, url).body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("an HTTP answer");
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.bytes().await.expect("the body").to_vec(),
    }
}

/// GET `path`.
async fn get(app: &BinaryApp, path: &str) -> Answer {
    call(app, reqwest::Method::GET, path, &[], Vec::new()).await
}

/// POST `path`, without a body.
async fn post(app: &BinaryApp, path: &str) -> Answer {
    call(app, reqwest::Method::POST, path, &[], Vec::new()).await
}

/// POST /v1/tasks with `key` (none: no header) and `body`.
async fn create(app: &BinaryApp, key: Option<&str>, body: &Value) -> Answer {
    let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
    call(
        app,
        reqwest::Method::POST,
        "/v1/tasks",
        &headers,
        body.to_string().into_bytes(),
    )
    .await
}

/// The JSON twin of [`email_request`].
fn email_json() -> Value {
    json!({
        "agent_id": "agent-7",
        "action": "send_email",
        "parameters": {"to": "ada@example.com", "subject": "hello", "attempt": 1}
    })
}

async fn a_create_is_created_and_its_retry_replayed_byte_for_byte(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[]).await;
    let key = new_key();

    let first = create(&app, Some(&key), &email_json()).await;
    // Another field order and the lowerCamelCase spelling: the same request.
    let reordered = json!({
        "parameters": {"attempt": 1, "subject": "hello", "to": "ada@example.com"},
        "action": "send_email",
        "agentId": "agent-7"
    });
    let retry = create(&app, Some(&key), &reordered).await;

    assert_eq!(first.status, 201);
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("idempotent-replayed"), Some("false"));
    let task = first.json();
    assert_eq!(task["status"], "TASK_STATUS_QUEUED");
    assert_eq!(task["agentId"], "agent-7");
    let task_id = task["taskId"].as_str().expect("a task id");
    assert_eq!(
        first.header("location"),
        Some(format!("/v1/tasks/{task_id}").as_str())
    );
    assert_eq!(retry.status, 201);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        retry.body, first.body,
        "a replay is the first answer, byte for byte"
    );
    assert_eq!(db.count("tasks").await, 1);
}

async fn a_key_used_on_one_surface_replays_on_the_other(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[]).await;
    let grpc_first = new_key();
    let http_first = new_key();

    let over_grpc = app
        .create(Some(&grpc_first), email_request())
        .await
        .expect("create over gRPC");
    // The IETF draft quotes the key, as a structured-field string.
    let quoted = format!("\"{grpc_first}\"");
    let over_http = create(&app, Some(&quoted), &email_json()).await;
    let http_created = create(&app, Some(&http_first), &email_json()).await;
    let grpc_retry = app
        .create(Some(&http_first), email_request())
        .await
        .expect("retry over gRPC");

    assert_eq!(over_http.status, 201);
    assert_eq!(over_http.header("idempotent-replayed"), Some("true"));
    assert_eq!(over_http.json()["taskId"], over_grpc.get_ref().task_id);
    assert_eq!(http_created.header("idempotent-replayed"), Some("false"));
    assert_eq!(replayed(&grpc_retry), Some("true"));
    assert_eq!(grpc_retry.get_ref().task_id, http_created.json()["taskId"]);
    assert_eq!(db.count("tasks").await, 2);
}

async fn a_reused_key_is_unprocessable_and_a_missing_one_a_bad_request(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[]).await;
    let key = new_key();
    create(&app, Some(&key), &email_json()).await;

    let reused = create(
        &app,
        Some(&key),
        &json!({"agent_id": "agent-7", "action": "send_sms"}),
    )
    .await;
    let missing = create(&app, None, &email_json()).await;
    let malformed = create(&app, Some("not a key"), &email_json()).await;

    reused.assert_problem(422, Some("IDEMPOTENCY_KEY_REUSED"));
    missing.assert_problem(400, Some("IDEMPOTENCY_KEY_MISSING"));
    let problem = malformed.assert_problem(400, Some("IDEMPOTENCY_KEY_INVALID"));
    assert_eq!(problem["errors"][0]["field"], "idempotency-key");
    assert_eq!(db.count("tasks").await, 1);
}

async fn a_request_in_flight_is_a_conflict_to_retry_later(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[("IN_FLIGHT_WAIT", "1s")]).await;
    let key = new_key();
    let (tx, _) = db.begin_in_flight(&key, &email_request()).await;

    let conflict = create(&app, Some(&key), &email_json()).await;
    tx.rollback().await;

    conflict.assert_problem(409, Some("IDEMPOTENCY_REQUEST_IN_PROGRESS"));
    let retry_after: u64 = conflict
        .header("retry-after")
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
}

async fn hostile_bodies_get_a_problem_and_store_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[("MAX_REQUEST_BYTES", "65536")]).await;
    let deep = format!(
        r#"{{"agent_id": "a", "action": "b", "parameters": {{"x": {}{}}}}}"#,
        "[".repeat(30_000),
        "]".repeat(30_000)
    );
    let bodies: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed", b"{\"agent_id\":".to_vec(), 400),
        ("not an object", b"[1, 2]".to_vec(), 400),
        ("unknown field", br#"{"agent": "a"}"#.to_vec(), 400),
        ("a number for a string", br#"{"agent_id": 7}"#.to_vec(), 400),
        ("deep", deep.into_bytes(), 400),
        // Past the bound, yet small enough to be sent whole before the
        // answer (a server that answers before reading may reset).
        ("huge", vec![b' '; 70_000], 413),
    ];

    for (what, body, status) in bodies {
        let answer = call(
            &app,
            reqwest::Method::POST,
            "/v1/tasks",
            &[("idempotency-key", &new_key())],
            body,
        )
        .await;
        let problem = answer.assert_problem(status, None);
        assert!(problem["reason"].is_string(), "{what}: {problem}");
    }

    db.assert_nothing_stored().await;
    // The server keeps serving.
    assert_eq!(
        create(&app, Some(&new_key()), &email_json()).await.status,
        201
    );
}

async fn tasks_are_read_waited_for_and_cancelled(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[]).await;
    let created = create(&app, Some(&new_key()), &email_json()).await.json();
    let task_id = created["taskId"].as_str().expect("a task id");

    let read = get(&app, &format!("/v1/tasks/{task_id}")).await;
    let listed = get(&app, "/v1/tasks?agent_id=agent-7&page_size=10").await;
    let waited = post(&app, &format!("/v1/tasks/{task_id}:wait?timeout=1s")).await;
    let cancelled = post(&app, &format!("/v1/tasks/{task_id}:cancel")).await;

    assert_eq!(read.status, 200);
    assert_eq!(read.json(), created);
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json()["tasks"][0]["taskId"], task_id);
    assert_eq!(waited.status, 200);
    assert_eq!(waited.json()["status"], "TASK_STATUS_QUEUED");
    assert_eq!(cancelled.status, 200);
    assert_eq!(cancelled.json()["status"], "TASK_STATUS_CANCELLED");
    let unknown = get(&app, &format!("/v1/tasks/{}", uuid::Uuid::new_v4())).await;
    unknown.assert_problem(404, None);
    let not_an_id = get(&app, "/v1/tasks/nope").await;
    not_an_id.assert_problem(400, Some("INVALID_REQUEST"));
    let unknown_query = get(&app, "/v1/tasks?agent=agent-7").await;
    unknown_query.assert_problem(400, Some("INVALID_REQUEST"));
}

async fn forms_pages_of_other_origins_and_two_keys_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[]).await;
    let body = || email_json().to_string().into_bytes();

    let form = call(
        &app,
        reqwest::Method::POST,
        "/v1/tasks",
        &[
            ("idempotency-key", &new_key()),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        body(),
    )
    .await;
    let from_a_page = call(
        &app,
        reqwest::Method::POST,
        "/v1/tasks",
        &[
            ("idempotency-key", &new_key()),
            ("origin", "https://evil.example"),
        ],
        body(),
    )
    .await;
    let (one, other) = (new_key(), new_key());
    let two_keys = call(
        &app,
        reqwest::Method::POST,
        "/v1/tasks",
        &[
            ("idempotency-key", &format!("\"{one}\"")),
            ("idempotency-key", &other),
        ],
        body(),
    )
    .await;

    form.assert_problem(415, Some("UNSUPPORTED_MEDIA_TYPE"));
    from_a_page.assert_problem(403, None);
    two_keys.assert_problem(400, Some("IDEMPOTENCY_KEY_INVALID"));
    db.assert_nothing_stored().await;
}

async fn unknown_routes_and_methods_are_refused_plainly(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[]).await;

    let no_route = call(&app, reqwest::Method::GET, "/v2/tasks", &[], Vec::new()).await;
    let wrong_method = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/tasks/{}", uuid::Uuid::new_v4()),
        &[],
        Vec::new(),
    )
    .await;

    no_route.assert_problem(404, None);
    wrong_method.assert_problem(405, None);
    assert_eq!(wrong_method.header("allow"), Some("GET"));
    // gRPC on the same port is unchanged.
    assert_status(
        app.create(None, email_request()).await,
        Code::InvalidArgument,
        Some("IDEMPOTENCY_KEY_MISSING"),
    );
}

async fn keyless_requests_are_deduplicated_under_the_fingerprint_policy(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[("MISSING_KEY_POLICY", "fingerprint")]).await;

    let first = create(&app, None, &email_json()).await;
    let repeat = create(&app, None, &email_json()).await;

    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotency-key-source"), Some("fingerprint"));
    assert_eq!(repeat.header("idempotent-replayed"), Some("true"));
    assert_eq!(repeat.body, first.body);
    assert_eq!(db.count("tasks").await, 1);
}

async fn api_keys_are_bearer_tokens_over_http(backend: Backend) {
    let db = TestDb::new(backend).await;
    let token = crate::auth::create_key(&db, "agent7", "agent", &[("--agent-id", "agent-7")]);
    let app = BinaryApp::start(&db, &[]).await;
    let bearer = format!("Bearer {token}");
    let key = new_key();

    let without = create(&app, Some(&key), &email_json()).await;
    let with = call(
        &app,
        reqwest::Method::POST,
        "/v1/tasks",
        &[("idempotency-key", &key), ("authorization", &bearer)],
        email_json().to_string().into_bytes(),
    )
    .await;
    let for_another_agent = call(
        &app,
        reqwest::Method::POST,
        "/v1/tasks",
        &[("idempotency-key", &new_key()), ("authorization", &bearer)],
        json!({"agent_id": "agent-8", "action": "send_email"})
            .to_string()
            .into_bytes(),
    )
    .await;

    let malformed_without = call(
        &app,
        reqwest::Method::POST,
        "/v1/tasks",
        &[("idempotency-key", &new_key())],
        b"{not json".to_vec(),
    )
    .await;

    without.assert_problem(401, Some("API_KEY_INVALID"));
    // The body is read only after the gates let the call in.
    malformed_without.assert_problem(401, Some("API_KEY_INVALID"));
    assert_eq!(without.header("www-authenticate"), Some("Bearer"));
    assert_eq!(with.status, 201);
    for_another_agent.assert_problem(403, Some("PERMISSION_DENIED"));
}

async fn callers_past_their_rate_are_told_when_to_come_back(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[("RATE_LIMIT", "1"), ("RATE_BURST", "1")]).await;
    let path = format!("/v1/tasks/{}", uuid::Uuid::new_v4());

    let limited = eventually(Duration::from_secs(30), "a call past the rate", || async {
        let answer = call(&app, reqwest::Method::GET, &path, &[], Vec::new()).await;
        (answer.status == 429).then_some(answer)
    })
    .await;

    limited.assert_problem(429, Some("RATE_LIMITED"));
    assert!(limited.header("retry-after").is_some());
}

async fn http_calls_are_counted_as_the_rpcs_they_are(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = BinaryApp::start(&db, &[]).await;

    create(&app, Some(&new_key()), &email_json()).await;
    create(&app, None, &email_json()).await;

    let handled = |code| {
        let mut labels = rpc("tasks.v1.TaskService", "CreateTask");
        labels.push(("grpc_code", code));
        labels
    };
    scrape_until(&app.metrics, "the HTTP calls to be counted", |scrape| {
        value(scrape, "grpc_server_handled_total", &handled("OK")) == Some(1.0)
            && value(
                scrape,
                "grpc_server_handled_total",
                &handled("InvalidArgument"),
            ) == Some(1.0)
    })
    .await;
}

/// The database away: the JSON API answers 503 with Retry-After, as gRPC
/// answers UNAVAILABLE with RetryInfo, and serves again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_away_is_unavailable_with_a_time_to_come_back() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = PgProxy::start(&db).await;
    let app = TestApp::spawn_with(test_settings(&db.url_via(proxy.port))).await;
    let base = format!("http://{}", app.addr);
    let path = format!("/v1/tasks/{}", uuid::Uuid::new_v4());
    proxy.cut();

    let away = eventually(
        Duration::from_secs(30),
        "a 503 while the database is away",
        || async {
            let answer = call_at(&base, reqwest::Method::GET, &path, &[], Vec::new()).await;
            (answer.status == 503).then_some(answer)
        },
    )
    .await;
    proxy.restore();

    away.assert_problem(503, Some("DATABASE_UNAVAILABLE"));
    assert!(away.header("retry-after").is_some());
    eventually(
        Duration::from_secs(30),
        "a 404 once the database is back",
        || async {
            let answer = call_at(&base, reqwest::Method::GET, &path, &[], Vec::new()).await;
            (answer.status == 404).then_some(())
        },
    )
    .await;
}

conformance!(
    http_calls_are_counted_as_the_rpcs_they_are,
    forms_pages_of_other_origins_and_two_keys_are_refused,
    a_create_is_created_and_its_retry_replayed_byte_for_byte,
    a_key_used_on_one_surface_replays_on_the_other,
    a_reused_key_is_unprocessable_and_a_missing_one_a_bad_request,
    a_request_in_flight_is_a_conflict_to_retry_later,
    hostile_bodies_get_a_problem_and_store_nothing,
    tasks_are_read_waited_for_and_cancelled,
    unknown_routes_and_methods_are_refused_plainly,
    keyless_requests_are_deduplicated_under_the_fingerprint_policy,
    api_keys_are_bearer_tokens_over_http,
    callers_past_their_rate_are_told_when_to_come_back,
);
