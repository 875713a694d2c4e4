//! API keys: who may call, in which role, for which agents and actions;
//! the protected default; the `oncely keys` commands.

use std::{process::Command, sync::Arc, time::Duration};

use oncely::{
    Settings,
    auth::AuthMode,
    proto::tasks_v1::{
        CancelTaskRequest, CleanupRequest, CompleteTaskRequest, CreateTaskRequest, GetTaskRequest,
        LeaseTasksRequest, ListTasksRequest, Task, WaitTaskRequest,
        worker_service_client::WorkerServiceClient,
    },
};
use serde_json::json;
use tonic::{Code, Request, Status, metadata::MetadataValue};

use crate::support::{
    BINARY, Backend, BinaryServer, TestApp, TestDb, assert_status, eventually, is_serving, keyed,
    new_key, request, test_settings,
};

/// Runs `oncely keys ARGS` on `db`; returns its standard output.
pub(crate) fn keys_command(db: &TestDb, args: &[&str]) -> std::process::Output {
    Command::new(BINARY)
        .arg("keys")
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run oncely keys")
}

/// Creates a key with `oncely keys create` and returns its token.
pub(crate) fn create_key(db: &TestDb, name: &str, role: &str, scope: &[(&str, &str)]) -> String {
    let mut args = vec!["create", "--name", name, "--role", role];
    for (flag, value) in scope {
        args.extend([*flag, *value]);
    }
    let output = keys_command(db, &args);
    assert!(output.status.success(), "keys create failed: {output:?}");
    let token = String::from_utf8(output.stdout).expect("utf-8");
    token.trim().to_owned()
}

/// `message` with `authorization: Bearer <token>`.
pub(crate) fn with_token<T>(token: &str, mut call: Request<T>) -> Request<T> {
    let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("metadata");
    call.metadata_mut().insert("authorization", value);
    call
}

fn settings(db: &TestDb) -> Settings {
    let mut settings = test_settings(&db.url);
    settings.key_refresh_interval = Duration::from_millis(200);
    settings
}

async fn create_as(app: &TestApp, token: &str, agent_id: &str) -> Result<Task, Status> {
    let call = keyed(
        Some(&new_key()),
        request(agent_id, "send_email", json!({"to": "ada@example.com"})),
    );
    app.tasks
        .clone()
        .create_task(with_token(token, call))
        .await
        .map(|r| r.into_inner())
}

async fn get_as(app: &TestApp, token: &str, task_id: &str) -> Result<Task, Status> {
    let call = Request::new(GetTaskRequest {
        task_id: task_id.into(),
    });
    app.tasks
        .clone()
        .get_task(with_token(token, call))
        .await
        .map(|r| r.into_inner())
}

async fn lease_as(app: &TestApp, token: &str, actions: &[&str]) -> Result<Vec<String>, Status> {
    let call = Request::new(LeaseTasksRequest {
        worker_id: "w".into(),
        actions: actions.iter().map(|a| a.to_string()).collect(),
        max_tasks: 10,
        ..Default::default()
    });
    WorkerServiceClient::new(app.channel.clone())
        .lease_tasks(with_token(token, call))
        .await
        .map(|r| {
            r.into_inner()
                .leases
                .into_iter()
                .filter_map(|l| l.task.map(|t| t.task_id))
                .collect()
        })
}

async fn cleanup_as(app: &TestApp, token: &str) -> Result<i64, Status> {
    let call = Request::new(CleanupRequest { older_than: None });
    app.admin
        .clone()
        .cleanup(with_token(token, call))
        .await
        .map(|r| r.into_inner().deleted)
}

async fn once_a_key_exists_every_call_needs_one(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let before = create_as(&app, "", "agent-7").await;
    let admin = create_key(&db, "ops", "admin", &[]);

    let refused = eventually(Duration::from_secs(30), "keys to be required", || async {
        let call = keyed(Some(&new_key()), crate::support::email_request());
        app.tasks.clone().create_task(call).await.err()
    })
    .await;
    let forged = create_as(&app, "oncely_forged", "agent-7").await;
    let keyless = app
        .tasks
        .clone()
        .create_task(Request::new(crate::support::email_request()))
        .await;
    let allowed = create_as(&app, &admin, "agent-7").await;

    before.expect("open while no key existed");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_status(forged, Code::Unauthenticated, Some("API_KEY_INVALID"));
    // Who calls is checked before what the call holds.
    assert_status(keyless, Code::Unauthenticated, Some("API_KEY_INVALID"));
    allowed.expect("an admin may create");
    assert!(admin.starts_with("oncely_") && admin.len() > 40);
    app.health("").await.expect("health stays open");
}

async fn each_role_may_call_its_services_only(backend: Backend) {
    let db = TestDb::new(backend).await;
    let agent = create_key(&db, "agent", "agent", &[("--agent-id", "agent-7")]);
    let worker = create_key(&db, "worker", "worker", &[]);
    let admin = create_key(&db, "admin", "admin", &[]);
    let app = TestApp::spawn_with(settings(&db)).await;

    let by_agent = create_as(&app, &agent, "agent-7").await;
    let agent_leases = lease_as(&app, &agent, &[]).await;
    let agent_cleans = cleanup_as(&app, &agent).await;
    let worker_creates = create_as(&app, &worker, "agent-7").await;
    let worker_leases = lease_as(&app, &worker, &[]).await;
    let worker_cleans = cleanup_as(&app, &worker).await;
    let admin_creates = create_as(&app, &admin, "anyone").await;
    let admin_cleans = cleanup_as(&app, &admin).await;

    let task = by_agent.expect("an agent creates");
    get_as(&app, &agent, &task.task_id)
        .await
        .expect("and reads its task");
    assert_status(
        agent_leases,
        Code::PermissionDenied,
        Some("PERMISSION_DENIED"),
    );
    assert_status(
        agent_cleans,
        Code::PermissionDenied,
        Some("PERMISSION_DENIED"),
    );
    assert_status(
        worker_creates,
        Code::PermissionDenied,
        Some("PERMISSION_DENIED"),
    );
    assert_eq!(
        worker_leases.expect("a worker leases"),
        std::slice::from_ref(&task.task_id)
    );
    assert_status(
        worker_cleans,
        Code::PermissionDenied,
        Some("PERMISSION_DENIED"),
    );
    admin_creates.expect("an admin creates for any agent");
    admin_cleans.expect("an admin cleans up");
}

async fn an_agent_key_sees_only_its_own_agents_tasks(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mine = create_key(&db, "mine", "agent", &[("--agent-id", "agent-7")]);
    let theirs = create_key(&db, "theirs", "agent", &[("--agent-id", "agent-8")]);
    let app = TestApp::spawn_with(settings(&db)).await;
    let task = create_as(&app, &mine, "agent-7").await.expect("create");

    let for_another = create_as(&app, &theirs, "agent-7").await;
    let got = get_as(&app, &theirs, &task.task_id).await;
    let waited = app
        .tasks
        .clone()
        .wait_task(with_token(
            &theirs,
            Request::new(WaitTaskRequest {
                task_id: task.task_id.clone(),
                timeout: None,
            }),
        ))
        .await;
    let cancelled = app
        .tasks
        .clone()
        .cancel_task(with_token(
            &theirs,
            Request::new(CancelTaskRequest {
                task_id: task.task_id.clone(),
            }),
        ))
        .await;
    let listed = app
        .tasks
        .clone()
        .list_tasks(with_token(
            &theirs,
            Request::new(ListTasksRequest {
                agent_id: "agent-7".into(),
                ..Default::default()
            }),
        ))
        .await;

    assert_status(
        for_another,
        Code::PermissionDenied,
        Some("PERMISSION_DENIED"),
    );
    for hidden in [
        got.map(drop),
        waited.map(drop),
        cancelled.map(drop),
        listed.map(drop),
    ] {
        assert_eq!(hidden.expect_err("hidden").code(), Code::NotFound);
    }
    let still = get_as(&app, &mine, &task.task_id).await.expect("get");
    assert_eq!(
        still.status(),
        oncely::proto::tasks_v1::TaskStatus::Queued,
        "not cancelled"
    );
}

async fn a_worker_key_performs_only_its_actions(backend: Backend) {
    let db = TestDb::new(backend).await;
    let admin = create_key(&db, "admin", "admin", &[]);
    let mailer = create_key(&db, "mailer", "worker", &[("--action", "send_email")]);
    let app = TestApp::spawn_with(settings(&db)).await;
    let email = create_as(&app, &admin, "a").await.expect("email");
    let charge = app
        .tasks
        .clone()
        .create_task(with_token(
            &admin,
            keyed(Some(&new_key()), request("a", "charge", json!({}))),
        ))
        .await
        .expect("charge")
        .into_inner();

    let other_action = lease_as(&app, &mailer, &["charge"]).await;
    let leased = lease_as(&app, &mailer, &[]).await.expect("lease");
    let admin_lease = WorkerServiceClient::new(app.channel.clone())
        .lease_tasks(with_token(
            &admin,
            Request::new(LeaseTasksRequest {
                worker_id: "admin".into(),
                actions: vec!["charge".into()],
                ..Default::default()
            }),
        ))
        .await
        .expect("admin lease")
        .into_inner()
        .leases
        .remove(0);
    let foreign = WorkerServiceClient::new(app.channel.clone())
        .complete_task(with_token(
            &mailer,
            Request::new(CompleteTaskRequest {
                task_id: charge.task_id.clone(),
                lease_token: admin_lease.lease_token,
                result: None,
            }),
        ))
        .await;

    assert_status(
        other_action,
        Code::PermissionDenied,
        Some("PERMISSION_DENIED"),
    );
    assert_eq!(leased, [email.task_id]);
    assert_eq!(foreign.expect_err("not its action").code(), Code::NotFound);
}

async fn a_revoked_key_stops_working_on_a_running_server(backend: Backend) {
    let db = TestDb::new(backend).await;
    let agent = create_key(&db, "leaving", "agent", &[("--agent-id", "agent-7")]);
    let app = Arc::new(TestApp::spawn_with(settings(&db)).await);
    // On PostgreSQL, a second instance on the same database.
    let other = match backend {
        Backend::Postgres => Some(TestApp::spawn_with(settings(&db)).await),
        Backend::Sqlite => None,
    };
    for instance in std::iter::once(&*app).chain(other.as_ref()) {
        create_as(instance, &agent, "agent-7")
            .await
            .expect("works before");
    }

    let output = keys_command(&db, &["revoke", "leaving"]);

    assert!(output.status.success(), "{output:?}");
    for instance in std::iter::once(&*app).chain(other.as_ref()) {
        let refused = eventually(Duration::from_secs(30), "the revocation", || async {
            create_as(instance, &agent, "agent-7").await.err()
        })
        .await;
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    let listed = String::from_utf8(keys_command(&db, &["list"]).stdout).expect("utf-8");
    assert!(
        listed.contains("leaving\tagent\tagents: agent-7"),
        "{listed}"
    );
    assert!(listed.contains("revoked"), "{listed}");
    assert!(!listed.contains(&agent), "a token was listed");
}

async fn the_keys_command_refuses_what_it_cannot_do(backend: Backend) {
    let db = TestDb::new(backend).await;
    create_key(&db, "taken", "admin", &[]);

    for args in [
        &["create", "--name", "taken", "--role", "admin"][..],
        &["create", "--name", "no-agents", "--role", "agent"],
        &["create", "--name", "bad name", "--role", "admin"],
        &["create", "--name", "x", "--role", "root"],
        &["revoke", "nobody"],
    ] {
        let output = keys_command(&db, args);
        assert!(!output.status.success(), "{args:?} should fail");
        assert!(
            !String::from_utf8_lossy(&output.stderr).is_empty(),
            "{args:?} should say why"
        );
    }
}

async fn without_keys_the_server_refuses_to_serve_beyond_loopback(backend: Backend) {
    let db = TestDb::new(backend).await;
    // Serves with `settings` on every address until it answers SERVING
    // (so past its checks: a shutdown already due would stop it before
    // them, however long opening the store takes), or until it refuses.
    let serve_everywhere = |settings: Settings| async move {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
            .await
            .expect("bind");
        let url = format!(
            "http://127.0.0.1:{}",
            listener.local_addr().expect("addr").port()
        );
        let serving = async move {
            eventually(Duration::from_secs(60), "the server to serve", || async {
                is_serving(&url).await.then_some(())
            })
            .await;
        };
        oncely::serve(listener, settings, serving).await
    };

    let refused = serve_everywhere(settings(&db)).await;
    let mut knowingly = settings(&db);
    knowingly.auth = AuthMode::Disabled;
    let disabled = serve_everywhere(knowingly).await;
    create_key(&db, "admin", "admin", &[]);
    let protected = serve_everywhere(settings(&db)).await;

    let error = refused.expect_err("refused");
    assert!(error.to_string().contains("oncely keys create"), "{error}");
    assert!(error.to_string().contains("AUTH=disabled"), "{error}");
    disabled.expect("AUTH=disabled serves anywhere");
    protected.expect("a key protects it");
}

#[tokio::test]
async fn tokens_never_appear_in_the_logs() {
    let db = TestDb::new(Backend::Sqlite).await;
    let token = create_key(&db, "secret", "agent", &[("--agent-id", "agent-7")]);
    let mut command = Command::new(BINARY);
    command
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "debug");
    let mut server = BinaryServer::spawn(command).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let mut tasks = oncely::proto::tasks_v1::task_service_client::TaskServiceClient::new(channel);
    let create = |token: &str, agent: &str| {
        with_token(
            token,
            keyed(
                Some(&new_key()),
                CreateTaskRequest {
                    agent_id: agent.into(),
                    action: "send_email".into(),
                    parameters: None,
                },
            ),
        )
    };

    tasks
        .create_task(create(&token, "agent-7"))
        .await
        .expect("allowed");
    let denied = tasks.create_task(create(&token, "agent-8")).await;
    let wrong = format!("{token}x");
    let unknown = tasks.create_task(create(&wrong, "agent-7")).await;
    for refused in [denied, unknown] {
        let status = refused.expect_err("refused");
        let shown = format!("{status:?} {:?}", status.details());
        assert!(!shown.contains(&token["oncely_".len()..]), "{shown}");
    }
    server.terminate();
    server.wait_for_exit(Duration::from_secs(20));

    let logs = server.log();
    assert!(
        logs.contains("permission_denied"),
        "the logs were not captured: {logs}"
    );
    assert!(!logs.contains(&token), "a token was logged");
    assert!(
        !logs.contains(&token["oncely_".len()..]),
        "a token was logged"
    );
}

async fn auth_required_refuses_calls_before_any_key_exists(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut required = settings(&db);
    required.auth = AuthMode::Required;
    let app = TestApp::spawn_with(required).await;

    let refused = app
        .create(Some(&new_key()), crate::support::email_request())
        .await;

    assert_status(refused, Code::Unauthenticated, None);
    app.health("").await.expect("health stays open");
}

async fn auth_disabled_serves_calls_without_a_key_while_keys_exist(backend: Backend) {
    let db = TestDb::new(backend).await;
    let token = create_key(&db, "ops", "admin", &[]);
    let mut disabled = settings(&db);
    disabled.auth = AuthMode::Disabled;
    let app = TestApp::spawn_with(disabled).await;

    let anonymous = app
        .create(Some(&new_key()), crate::support::email_request())
        .await;
    let with_key = create_as(&app, &token, "agent-7").await;

    anonymous.expect("no key needed");
    with_key.expect("a key is simply not checked");
}

async fn a_peer_guessing_tokens_is_slowed_down_and_keys_still_work(backend: Backend) {
    let db = TestDb::new(backend).await;
    let token = create_key(&db, "ops", "admin", &[]);
    let app = TestApp::spawn_with(settings(&db)).await;
    let guess = format!("{token}x");

    // Guesses in rounds of 100 at once, until some are slowed down: a
    // round takes far less than the 10 s that earn 100 more failures, so
    // this does not depend on how fast one call is.
    let mut unauthenticated = 0;
    let mut slowed = None;
    for _ in 0..10 {
        let round = (0..100).map(|_| create_as(&app, &guess, "agent-7"));
        for answer in futures::future::join_all(round).await {
            match answer {
                Err(status) if status.code() == Code::Unauthenticated => unauthenticated += 1,
                Err(status) if status.code() == Code::ResourceExhausted => slowed = Some(status),
                other => panic!("a guess got {other:?}"),
            }
        }
        if slowed.is_some() {
            break;
        }
    }

    let slowed = slowed.expect("guesses past the burst are slowed down");
    assert_status(
        Err::<(), _>(slowed.clone()),
        Code::ResourceExhausted,
        Some("RATE_LIMITED"),
    );
    assert!(tonic_types::StatusExt::get_details_retry_info(&slowed).is_some());
    assert!(unauthenticated >= 10, "{unauthenticated} refusals first");
    create_as(&app, &token, "agent-7")
        .await
        .expect("a valid key is not slowed down");
}

/// `call` with `token`'s key, if any.
fn maybe<T>(token: Option<&str>, call: Request<T>) -> Request<T> {
    match token {
        Some(token) => with_token(token, call),
        None => call,
    }
}

/// Every caller against one call of each service: no token, a revoked
/// key, and each role.
async fn the_role_matrix_holds_for_every_service(backend: Backend) {
    use oncely::proto::tasks_v1::ListTasksRequest;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let db = TestDb::new(backend).await;
    let agent = create_key(&db, "agent", "agent", &[("--agent-id", "agent-7")]);
    let worker = create_key(&db, "worker", "worker", &[]);
    let admin = create_key(&db, "admin", "admin", &[]);
    let revoked = create_key(&db, "gone", "admin", &[]);
    let output = keys_command(&db, &["revoke", "gone"]);
    assert!(output.status.success(), "{output:?}");
    let app = TestApp::spawn_with(settings(&db)).await;
    let task = create_as(&app, &admin, "agent-7").await.expect("a task");
    let code = |result: Result<(), Status>| result.map_or_else(|s| s.code(), |()| Code::Ok);
    let calls = |token: Option<String>| {
        let (app, task_id) = (&app, task.task_id.clone());
        async move {
            let token = token.as_deref();
            let mut tasks = app.tasks.clone();
            let mut workers = WorkerServiceClient::new(app.channel.clone());
            let create = tasks
                .create_task(maybe(
                    token,
                    keyed(Some(&new_key()), crate::support::email_request()),
                ))
                .await
                .map(drop);
            let get = tasks
                .get_task(maybe(token, Request::new(GetTaskRequest { task_id })))
                .await
                .map(drop);
            let list = tasks
                .list_tasks(maybe(
                    token,
                    Request::new(ListTasksRequest {
                        agent_id: "agent-7".into(),
                        ..Default::default()
                    }),
                ))
                .await
                .map(drop);
            let lease = workers
                .lease_tasks(maybe(
                    token,
                    Request::new(LeaseTasksRequest {
                        worker_id: "w".into(),
                        ..Default::default()
                    }),
                ))
                .await
                .map(drop);
            let cleanup = app
                .admin
                .clone()
                .cleanup(maybe(
                    token,
                    Request::new(CleanupRequest { older_than: None }),
                ))
                .await
                .map(drop);
            [
                code(create),
                code(get),
                code(list),
                code(lease),
                code(cleanup),
            ]
        }
    };
    use Code::{Ok as Y, PermissionDenied as D, Unauthenticated as U};

    let expected = [
        ("no token", None, [U, U, U, U, U]),
        ("a revoked key", Some(revoked), [U, U, U, U, U]),
        ("an agent key", Some(agent), [Y, Y, Y, D, D]),
        ("a worker key", Some(worker), [D, D, D, Y, D]),
        ("an admin key", Some(admin), [Y, Y, Y, Y, Y]),
    ];
    for (who, token, codes) in expected {
        assert_eq!(
            calls(token).await,
            codes,
            "{who}: create, get, list, lease, cleanup"
        );
    }
    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let listed = reflection
        .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .expect("reflection stays open")
        .into_inner()
        .message()
        .await;
    assert!(matches!(listed, Ok(Some(_))), "{listed:?}");
    app.health("").await.expect("health stays open");
}

conformance!(
    the_role_matrix_holds_for_every_service,
    a_peer_guessing_tokens_is_slowed_down_and_keys_still_work,
    auth_required_refuses_calls_before_any_key_exists,
    auth_disabled_serves_calls_without_a_key_while_keys_exist,
    once_a_key_exists_every_call_needs_one,
    each_role_may_call_its_services_only,
    an_agent_key_sees_only_its_own_agents_tasks,
    a_worker_key_performs_only_its_actions,
    a_revoked_key_stops_working_on_a_running_server,
    the_keys_command_refuses_what_it_cannot_do,
    without_keys_the_server_refuses_to_serve_beyond_loopback,
);
