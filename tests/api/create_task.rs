//! The idempotency contract, row by row.

use crate::support::Backend;

use oncely::proto::tasks_v1::{CreateTaskRequest, TaskStatus};
use prost::Message;
use prost_types::{Struct, Value, value::Kind};
use serde_json::json;
use tonic::{Code, metadata::MetadataValue};

use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    CREATE_TASK_PATH, TestApp, TestDb, assert_invalid, assert_status, email_request, keyed,
    new_key, replayed, request, test_settings, violated_fields,
};

async fn first_request_creates_a_queued_task_and_its_key_record_together(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();

    let response = app.create_with_key(&key).await;

    assert_eq!(replayed(&response), Some("false"));
    let task = response.into_inner();
    assert!(uuid::Uuid::parse_str(&task.task_id).is_ok());
    assert_eq!(task.status(), TaskStatus::Queued);
    assert_eq!(task.agent_id, "agent-7");
    assert_eq!(task.action, "send_email");
    assert_eq!(task.parameters, email_request().parameters);
    assert!(task.create_time.is_some());
    assert!(task.result.is_none());
    let record = db.key_record(&key).await.expect("the key record");
    assert_eq!(record.task_id, task.task_id);
    assert_eq!(record.response, task.encode_to_vec());
    assert_eq!(db.orphans().await, (0, 0));
    assert_eq!(db.count("tasks").await, 1);
}

/// Task ids are UUID v7: made one after another, they sort in the order
/// they were made, so each store's indexes of task ids take a new task on
/// their last page (BENCHMARKS.md, issue 24).
async fn task_ids_are_uuid_v7_in_the_order_tasks_were_created(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    let first = app.create_with_key(&new_key()).await.into_inner();
    let second = app.create_with_key(&new_key()).await.into_inner();

    let id = |task: &oncely::proto::tasks_v1::Task| {
        uuid::Uuid::parse_str(&task.task_id).expect("a task id is a UUID")
    };
    let (first, second) = (id(&first), id(&second));
    assert_eq!(first.get_version_num(), 7, "{first}");
    assert_eq!(second.get_version_num(), 7, "{second}");
    // One process makes its v7 ids in increasing order, within one
    // millisecond too (the uuid crate's counter).
    assert!(first < second, "{first} then {second}");
}

async fn retry_with_same_key_returns_the_first_response_byte_for_byte(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let body = email_request().encode_to_vec();

    let first = app
        .raw_call(CREATE_TASK_PATH, Some(&key), body.clone())
        .await
        .expect("first");
    let retry = app
        .raw_call(CREATE_TASK_PATH, Some(&key), body)
        .await
        .expect("retry");

    assert_eq!(replayed(&first), Some("false"));
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(db.count("tasks").await, 1);
    assert_eq!(db.count("idempotency_keys").await, 1);
}

/// A record written by another build (newer, or older after a rollback)
/// may hold fields this build does not know: its replay still sends the
/// bytes as stored, not what this build would make of them.
async fn a_replay_sends_the_stored_bytes_even_with_fields_this_build_does_not_know(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn_uncached(&db).await;
    let key = new_key();
    let body = email_request().encode_to_vec();
    let first = app
        .raw_call(CREATE_TASK_PATH, Some(&key), body.clone())
        .await
        .expect("first");
    // Field 100, a varint 1: unknown to this build's Task.
    let mut stored = first.get_ref().clone();
    stored.extend_from_slice(&[0xa0, 0x06, 0x01]);
    db.set_stored_response(&key, &stored).await;

    let retry = app
        .raw_call(CREATE_TASK_PATH, Some(&key), body)
        .await
        .expect("retry");

    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.get_ref(), &stored, "the stored bytes, as stored");
}

async fn same_key_with_a_different_request_is_refused_and_the_original_still_replays(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let original = app.create_with_key(&key).await.into_inner();
    let record_before = db.key_record(&key).await.expect("record");

    // Changes within the agent: the agent's key names the first request.
    let changes = [
        CreateTaskRequest {
            action: "send_sms".into(),
            ..email_request()
        },
        request(
            "agent-7",
            "send_email",
            json!({"to": "ada@example.com", "subject": "hello", "attempt": 2}),
        ),
        CreateTaskRequest {
            parameters: None,
            ..email_request()
        },
    ];
    for changed in changes {
        assert_status(
            app.create(Some(&key), changed).await,
            Code::FailedPrecondition,
            Some("IDEMPOTENCY_KEY_REUSED"),
        );
    }

    let record_after = db.key_record(&key).await.expect("record");
    assert_eq!(record_after, record_before);
    let replay = app
        .create(Some(&key), email_request())
        .await
        .expect("replay");
    assert_eq!(replayed(&replay), Some("true"));
    assert_eq!(replay.into_inner(), original);
    assert_eq!(db.count("tasks").await, 1);
}

/// Keys are scoped by the agent a task is for, also without API keys: the
/// same key for another agent is that agent's own, a task of its own.
async fn the_same_key_for_another_agent_is_that_agents_own(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let seventh = app
        .create(Some(&key), email_request())
        .await
        .expect("agent-7");

    let eighth = app
        .create(
            Some(&key),
            CreateTaskRequest {
                agent_id: "agent-8".into(),
                ..email_request()
            },
        )
        .await
        .expect("agent-8");

    assert_eq!(replayed(&eighth), Some("false"));
    assert_ne!(eighth.get_ref().task_id, seventh.get_ref().task_id);
    assert_eq!(db.count("tasks").await, 2);
}

async fn create_without_a_key_is_invalid_and_stores_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    assert_invalid(
        app.create(None, email_request()).await,
        "IDEMPOTENCY_KEY_MISSING",
    );

    db.assert_nothing_stored().await;
}

async fn malformed_keys_are_invalid_and_store_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let long = "k".repeat(256);
    let malformed: Vec<&[u8]> = vec![
        b"",
        long.as_bytes(),
        b"has space",
        b"tab\there",
        "é".as_bytes(),
        b"\x80abc",
    ];

    for key in malformed {
        let mut req = tonic::Request::new(email_request());
        req.metadata_mut().insert(
            "idempotency-key",
            MetadataValue::try_from(key).expect("a legal header value"),
        );
        let status = assert_invalid(
            app.tasks.clone().create_task(req).await,
            "IDEMPOTENCY_KEY_INVALID",
        );
        assert_eq!(violated_fields(&status), ["idempotency-key"], "key {key:?}");
    }
    let mut two_keys = tonic::Request::new(email_request());
    two_keys
        .metadata_mut()
        .append("idempotency-key", new_key().parse().unwrap());
    two_keys
        .metadata_mut()
        .append("idempotency-key", new_key().parse().unwrap());
    assert_invalid(
        app.tasks.clone().create_task(two_keys).await,
        "IDEMPOTENCY_KEY_INVALID",
    );

    db.assert_nothing_stored().await;
}

async fn keys_at_the_limits_of_the_rules_are_accepted(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    for key in ["!".to_owned(), "~".repeat(255), "a".repeat(255)] {
        app.create(Some(&key), email_request())
            .await
            .expect("a valid key");
    }

    assert_eq!(db.count("idempotency_keys").await, 3);
}

fn value(kind: Kind) -> Value {
    Value { kind: Some(kind) }
}

async fn invalid_requests_name_the_field_and_leave_the_key_unused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let nan = Struct {
        fields: [("amount".to_string(), value(Kind::NumberValue(f64::NAN)))].into(),
    };
    let no_kind = Struct {
        fields: [("x".to_string(), Value { kind: None })].into(),
    };
    let cases = [
        (
            CreateTaskRequest {
                agent_id: String::new(),
                ..email_request()
            },
            vec!["agent_id"],
        ),
        (
            CreateTaskRequest {
                action: String::new(),
                ..email_request()
            },
            vec!["action"],
        ),
        (
            CreateTaskRequest {
                agent_id: "a".repeat(256),
                ..email_request()
            },
            vec!["agent_id"],
        ),
        (
            CreateTaskRequest {
                action: "a".repeat(256),
                ..email_request()
            },
            vec!["action"],
        ),
        (
            CreateTaskRequest {
                parameters: Some(nan),
                ..email_request()
            },
            vec!["parameters.amount"],
        ),
        (
            CreateTaskRequest {
                parameters: Some(no_kind),
                ..email_request()
            },
            vec!["parameters.x"],
        ),
        (
            CreateTaskRequest {
                agent_id: String::new(),
                action: String::new(),
                parameters: None,
            },
            vec!["agent_id", "action"],
        ),
        (
            CreateTaskRequest {
                agent_id: "nul\0".into(),
                ..email_request()
            },
            vec!["agent_id"],
        ),
        (
            CreateTaskRequest {
                action: "nul\0".into(),
                ..email_request()
            },
            vec!["action"],
        ),
        (
            request("agent-7", "send_email", json!({"key\0": 1})),
            vec!["parameters"],
        ),
        (
            request("agent-7", "send_email", json!({"list": ["ok", "nul\0"]})),
            vec!["parameters.list[1]"],
        ),
    ];

    for (bad, fields) in cases {
        let status = assert_invalid(app.create(Some(&key), bad).await, "INVALID_REQUEST");
        assert_eq!(violated_fields(&status), fields);
    }
    db.assert_nothing_stored().await;

    let created = app
        .create(Some(&key), email_request())
        .await
        .expect("the key is unused");
    assert_eq!(replayed(&created), Some("false"));
}

async fn requests_over_the_size_limits_are_refused_and_the_server_keeps_serving(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.limits.max_parameters_bytes = 100;
    settings.max_request_bytes = 4096;
    let app = TestApp::spawn_with(settings).await;
    let key = new_key();

    let big_params = request("agent-7", "send_email", json!({"body": "x".repeat(200)}));
    let status = assert_invalid(app.create(Some(&key), big_params).await, "INVALID_REQUEST");
    assert_eq!(violated_fields(&status), ["parameters"]);
    let huge_message = request("agent-7", "send_email", json!({"body": "x".repeat(5000)}));
    let status = assert_status(
        app.create(Some(&key), huge_message).await,
        Code::ResourceExhausted,
        Some("REQUEST_TOO_LARGE"),
    );
    assert!(
        status.message().contains("4096 bytes"),
        "{}",
        status.message()
    );

    assert_eq!(db.count("idempotency_keys").await, 0);
    app.create(Some(&key), email_request())
        .await
        .expect("still serving, key unused");
}

async fn caller_input_in_errors_is_cut_to_a_short_prefix(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let long_name = "n".repeat(100_000);
    let nul_name = format!("{}\0", "\u{1}".repeat(100_000));

    let mut bad_value = request(
        "agent-7",
        "send_email",
        json!({ long_name: {"x": [1, null, {}]} }),
    );
    // A number JSON cannot hold, deep under the long member name.
    if let Some(Kind::StructValue(inner)) = bad_value
        .parameters
        .as_mut()
        .and_then(|p| p.fields.values_mut().next())
        .and_then(|v| v.kind.as_mut())
    {
        inner
            .fields
            .insert("nan".into(), value(Kind::NumberValue(f64::NAN)));
    }
    let status = assert_invalid(
        app.create(Some(&new_key()), bad_value).await,
        "INVALID_REQUEST",
    );
    let fields = violated_fields(&status);
    assert_eq!(fields.len(), 1);
    assert!(fields[0].starts_with("parameters.nnnn"), "{fields:?}");
    assert!(fields[0].len() < 100, "{fields:?}");
    assert!(status.message().len() < 500);

    let status = assert_invalid(
        app.create(
            Some(&new_key()),
            request("agent-7", "send_email", json!({ nul_name: 1 })),
        )
        .await,
        "INVALID_REQUEST",
    );
    assert!(status.message().len() < 500, "{}", status.message());
    assert_eq!(db.count("idempotency_keys").await, 0);
}

/// `depth` nested `Struct`s in a CreateTaskRequest's `parameters`, encoded
/// by hand: deeper than prost will decode.
fn deeply_nested_request(depth: usize) -> Vec<u8> {
    fn length_delimited(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        prost::encoding::encode_varint(body.len() as u64, &mut out);
        out.extend_from_slice(body);
        out
    }
    // A Struct holding {"a": value}: fields (1) = entry { key (1), value (2) }.
    let holding = |value: &[u8]| {
        let mut entry = length_delimited(0x0a, b"a");
        entry.extend(length_delimited(0x12, value));
        length_delimited(0x0a, &entry)
    };
    // Value { struct_value (5) }, starting from an empty Struct.
    let mut value = length_delimited(0x2a, b"");
    for _ in 0..depth {
        value = length_delimited(0x2a, &holding(&value));
    }
    let mut request = length_delimited(0x0a, b"agent-7");
    request.extend(length_delimited(0x12, b"send_email"));
    request.extend(length_delimited(0x1a, &holding(&value)));
    request
}

async fn undecodable_requests_are_invalid_arguments_and_the_server_keeps_serving(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let mut not_utf8 = vec![0x0a, 0x02, 0xff, 0xfe];
    not_utf8.extend([0x12, 0x01, b'x']);

    for (what, body) in [
        ("garbage", vec![0xff, 0xff, 0xff, 0xff]),
        ("a truncated field", vec![0x0a, 0x10, b'a']),
        ("a string that is not UTF-8", not_utf8),
        (
            "nesting past the decoder's limit",
            deeply_nested_request(120),
        ),
    ] {
        let status = assert_invalid(
            app.raw_call(CREATE_TASK_PATH, Some(&new_key()), body).await,
            "UNDECODABLE_REQUEST",
        );
        assert!(status.message().len() < 500, "{what}: {}", status.message());
    }

    assert_eq!(db.count("idempotency_keys").await, 0);
    assert_eq!(
        app.health("").await.expect("health"),
        ServingStatus::Serving
    );
    app.create(Some(&new_key()), email_request())
        .await
        .expect("still serving");
}

/// The request shapes that once cost far more than their size, at the
/// default limits: each gets a clean error of the right code with a short
/// message, and health checks are answered while they run. What they cost
/// is measured by `benches/hostile.rs`, not here.
async fn costly_request_shapes_get_clean_errors_while_health_is_answered(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let value = |kind: Kind| Value { kind: Some(kind) };
    let one_member = |name: String, member: Value| {
        CreateTaskRequest {
            agent_id: "agent-1".into(),
            action: "probe".into(),
            parameters: Some(Struct {
                fields: [(name, member)].into_iter().collect(),
            }),
        }
        .encode_to_vec()
    };
    let nulls = value(Kind::ListValue(prost_types::ListValue {
        values: vec![value(Kind::NullValue(0)); 300_000],
    }));
    let wide = CreateTaskRequest {
        agent_id: "agent-1".into(),
        action: "probe".into(),
        parameters: Some(Struct {
            fields: (0..100_000)
                .map(|i| (format!("k{i}"), value(Kind::NumberValue(f64::from(i)))))
                .collect(),
        }),
    }
    .encode_to_vec();
    let shapes = [
        (
            "a 2 MiB name holding 300,000 nulls",
            one_member("n".repeat(2 << 20), nulls),
            Code::InvalidArgument,
        ),
        ("100,000 members", wide, Code::InvalidArgument),
        (
            "a 3 MiB string",
            one_member("s".into(), value(Kind::StringValue("x".repeat(3 << 20)))),
            Code::InvalidArgument,
        ),
        (
            "a name of control characters",
            one_member("\u{1}".repeat(1 << 20), value(Kind::NumberValue(1.0))),
            Code::InvalidArgument,
        ),
        (
            "nesting past the decoder's limit",
            deeply_nested_request(200),
            Code::InvalidArgument,
        ),
        (
            "undecodable bytes",
            vec![0xff; 1 << 20],
            Code::InvalidArgument,
        ),
        (
            "a message over the size limit",
            one_member("s".into(), value(Kind::StringValue("x".repeat(5 << 20)))),
            Code::ResourceExhausted,
        ),
    ];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let channel = app.channel.clone();
    let prober = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut answered = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A generous bound, even for a busy machine: a server
                // stalled by a request (as it once was, for 14 to 26 s)
                // would still miss it.
                tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    crate::support::health(&channel, ""),
                )
                .await
                .expect("health is answered throughout")
                .expect("health");
                answered += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            answered
        }
    });

    for (what, body, code) in shapes {
        let answer = app.raw_call(CREATE_TASK_PATH, Some(&new_key()), body).await;
        let status = answer.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().len() < 500, "{what}: {}", status.message());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    assert!(prober.await.expect("join") > 0);
    db.assert_nothing_stored().await;
}

async fn a_request_without_parameters_is_the_same_as_empty_parameters(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();

    let first = app
        .create(
            Some(&key),
            CreateTaskRequest {
                parameters: None,
                ..email_request()
            },
        )
        .await
        .expect("create");
    let retry = app
        .create(
            Some(&key),
            CreateTaskRequest {
                parameters: Some(Struct::default()),
                ..email_request()
            },
        )
        .await
        .expect("retry");

    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.into_inner(), first.into_inner());
}

async fn get_and_list_ignore_the_key(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let task = app.create_email().await;

    let got = app
        .tasks
        .clone()
        .get_task(keyed(
            Some("not a valid key"),
            oncely::proto::tasks_v1::GetTaskRequest {
                task_id: task.task_id.clone(),
            },
        ))
        .await
        .expect("GetTask does not look at the key");

    assert_eq!(got.into_inner(), task);
}

async fn a_failing_write_stores_nothing_reveals_no_internals_and_the_next_request_works(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    db.rename_table("tasks", "tasks_away").await;

    let status = assert_status(
        app.create(Some(&key), email_request()).await,
        Code::Internal,
        None,
    );
    db.rename_table("tasks_away", "tasks").await;

    assert_eq!(status.message(), "internal error");
    assert_eq!(db.count("idempotency_keys").await, 0);
    let created = app
        .create(Some(&key), email_request())
        .await
        .expect("the key is unused and writes work again");
    assert_eq!(replayed(&created), Some("false"));
    assert_eq!(db.orphans().await, (0, 0));
}

conformance!(
    a_replay_sends_the_stored_bytes_even_with_fields_this_build_does_not_know,
    costly_request_shapes_get_clean_errors_while_health_is_answered,
    a_failing_write_stores_nothing_reveals_no_internals_and_the_next_request_works,
    first_request_creates_a_queued_task_and_its_key_record_together,
    task_ids_are_uuid_v7_in_the_order_tasks_were_created,
    retry_with_same_key_returns_the_first_response_byte_for_byte,
    same_key_with_a_different_request_is_refused_and_the_original_still_replays,
    the_same_key_for_another_agent_is_that_agents_own,
    create_without_a_key_is_invalid_and_stores_nothing,
    malformed_keys_are_invalid_and_store_nothing,
    keys_at_the_limits_of_the_rules_are_accepted,
    invalid_requests_name_the_field_and_leave_the_key_unused,
    requests_over_the_size_limits_are_refused_and_the_server_keeps_serving,
    caller_input_in_errors_is_cut_to_a_short_prefix,
    undecodable_requests_are_invalid_arguments_and_the_server_keeps_serving,
    a_request_without_parameters_is_the_same_as_empty_parameters,
    get_and_list_ignore_the_key,
);
