//! The plans PostgreSQL caches for the server's statements. A pooled
//! connection keeps a statement's generic plan until the table's statistics
//! change, so a plan made while the tables were empty (a new deployment, a
//! benchmark's first second) must still reach a key through the primary
//! key and a task through its own indexes: a plan that walks a table, or
//! every live key of a scope through the cleanup index, gets slower with
//! every key stored.

use std::time::Duration;

use chrono::Utc;
use oncely::{
    domain::{Completion, Failure, LeaseRef, TaskId},
    storage::{Claimed, FailureOutcome, KeyClaim, postgres::queries},
};
use serde_json::Value;
use sqlx::Row;

use crate::support::{Backend, TestApp, TestDb};

const SCOPE: &str = "tasks.v1.TaskService/CreateTask";
const RETENTION: Duration = Duration::from_secs(3600);

fn claim(key: &str) -> KeyClaim {
    KeyClaim {
        scope: SCOPE,
        key: key.to_owned(),
        twins: Vec::new(),
        fingerprint: [7; 32],
        task_id: uuid::Uuid::new_v4(),
        agent_id: "agent-1".into(),
        action: "send_email".into(),
        parameters_json: "{}".into(),
        create_time: Utc::now(),
        response: vec![1, 2, 3],
        retention: RETENTION,
    }
}

/// Every scan in a JSON plan: (node type, relation, index).
fn scans(plan: &Value, found: &mut Vec<(String, String, String)>) {
    if let Some(node) = plan.get("Node Type").and_then(Value::as_str) {
        let field = |name| {
            plan.get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        if node.contains("Scan") {
            found.push((node.to_owned(), field("Relation Name"), field("Index Name")));
        }
    }
    match plan {
        Value::Array(items) => items.iter().for_each(|item| scans(item, found)),
        Value::Object(fields) => fields.values().for_each(|value| scans(value, found)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_made_on_empty_tables_reach_keys_and_tasks_by_their_indexes() {
    let db = TestDb::new(Backend::Postgres).await;
    // The server makes the schema.
    let _app = TestApp::spawn(&db).await;
    // A few hundred keys and tasks: the first seconds of a deployment.
    let early: Vec<KeyClaim> = (0..300).map(|i| claim(&format!("early-{i}"))).collect();
    queries::claim_keys(db.pg_pool(), &early, RETENTION)
        .await
        .expect("the early claims");
    let mut conn = db.pg_pool().acquire().await.expect("a connection");
    // As a connection whose statements have run often enough on empty
    // tables that PostgreSQL settled on their generic plans.
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .expect("set plan_cache_mode");

    // The statements of a create, a replay, a lookup, a read, a lease and
    // a completion, each run once on this connection so that it holds them.
    let first = claim("key-1");
    let created = queries::claim_keys(&mut *conn, std::slice::from_ref(&first), RETENTION)
        .await
        .expect("claim");
    assert!(matches!(created[..], [Claimed::Created]), "{created:?}");
    let again = queries::claim_keys(&mut *conn, &[claim("key-1")], RETENTION)
        .await
        .expect("claim again");
    assert!(matches!(again[..], [Claimed::Held(_)]), "{again:?}");
    let found = queries::find_key(&mut *conn, SCOPE, "key-1", RETENTION)
        .await
        .expect("find the key");
    assert!(found.record.is_some(), "the key's record is found");
    let legacy = queries::find_legacy_key(
        &mut *conn,
        SCOPE,
        &["agent7-a early-1".to_owned(), "early-2".to_owned()],
        "agent-1",
        RETENTION,
    )
    .await
    .expect("look for a record of the earlier scope");
    // The early claims' keys are bare, as an unauthenticated caller's
    // were in the earlier scope.
    assert!(legacy.is_some(), "the bare key's record is found");
    queries::get_task(&mut *conn, first.task_id)
        .await
        .expect("get")
        .expect("the task");
    let candidates = queries::lease_candidates(&mut *conn, &[], 1, &[uuid::Uuid::new_v4()])
        .await
        .expect("the lease's candidates");
    let candidate = candidates.first().expect("a leasable task");
    let leased = queries::lease_chosen(
        &mut *conn,
        &[queries::Chosen {
            candidate,
            order: 1,
            worker_id: "worker-1",
            ends: false,
            message: None,
        }],
        Duration::from_secs(30),
    )
    .await
    .expect("lease");
    let (_, task) = leased.first().expect("the task is leased");
    let lease_token = task.lease_token.expect("a lease token");
    let lease = LeaseRef {
        task_id: TaskId(task.task_id),
        token: lease_token,
    };
    queries::renew_lease(&mut *conn, lease, Duration::from_secs(30))
        .await
        .expect("renew")
        .expect("the lease was current");
    queries::complete_task(
        &mut *conn,
        &Completion {
            lease: LeaseRef {
                task_id: TaskId(task.task_id),
                token: lease_token,
            },
            result: serde_json::Map::new(),
            result_json: "{}".into(),
        },
    )
    .await
    .expect("complete")
    .expect("the lease was current");
    // A failure and a cancellation that find no lease, a page of an
    // agent's tasks, and a cleanup batch.
    let stranger = LeaseRef {
        task_id: TaskId(uuid::Uuid::new_v4()),
        token: uuid::Uuid::new_v4(),
    };
    let failed = queries::fail_task(
        &mut *conn,
        &Failure {
            lease: stranger,
            message: "boom".into(),
            permanent: false,
            retry_after: None,
        },
        &FailureOutcome {
            attempt: 1,
            retry_in: Some(Duration::from_secs(1)),
        },
    )
    .await
    .expect("fail");
    assert!(failed.is_none(), "no such lease");
    let cancelled = queries::cancel_task(&mut *conn, stranger.task_id.0)
        .await
        .expect("cancel");
    assert!(cancelled.is_none(), "no such task");
    let page = queries::list_tasks(&mut *conn, "agent-1", 0, 10, 1 << 20)
        .await
        .expect("list");
    assert_eq!(page.tasks.len(), 10);
    queries::delete_keys_created_before(&mut *conn, SCOPE, Utc::now() - RETENTION, 100)
        .await
        .expect("cleanup");
    let failures = queries::recent_failures(&mut *conn, 20)
        .await
        .expect("the latest failures");
    assert!(failures.len() <= 20);

    let statements = sqlx::query(
        "SELECT name, statement, cardinality(parameter_types) AS parameters \
         FROM pg_prepared_statements \
         WHERE (statement LIKE '%idempotency_keys%' OR statement LIKE '%tasks%') \
           AND statement NOT LIKE '%pg_prepared_statements%' \
           AND name <> ''",
    )
    .fetch_all(&mut *conn)
    .await
    .expect("the connection's prepared statements");
    assert!(
        statements.len() >= 10,
        "every statement above is prepared on the connection: {}",
        statements.len()
    );
    for row in statements {
        let name: String = row.get("name");
        let statement: String = row.get("statement");
        let parameters: i32 = row.get("parameters");
        let nulls = vec!["NULL"; usize::try_from(parameters).expect("a count")].join(", ");
        let arguments = if nulls.is_empty() {
            String::new()
        } else {
            format!("({nulls})")
        };
        let explain = format!("EXPLAIN (FORMAT JSON) EXECUTE {name}{arguments}");
        let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
            .fetch_one(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("explain {statement}: {e}"));
        let mut found = Vec::new();
        scans(&plan, &mut found);
        for (node, relation, index) in found {
            assert!(
                !(node == "Seq Scan" && ["idempotency_keys", "tasks"].contains(&relation.as_str())),
                "a generic plan scans all of {relation}: {statement}\n{plan:#}"
            );
            // Cleanup walks that index on purpose; a lookup must not.
            if statement.starts_with("DELETE FROM idempotency_keys") {
                continue;
            }
            assert_ne!(
                index, "idempotency_keys_scope_created_at",
                "a generic plan walks the live keys of a scope to find one: {statement}\n{plan:#}"
            );
        }
    }
}
