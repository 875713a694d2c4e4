//! Which tasks a lease takes, however the polls are batched: each answer
//! within its count and byte limits, no task in two answers, every task
//! leased in the end; and no poll answered empty while tasks wait, across
//! instances (a statement locks only the tasks it hands out).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use oncely::{
    domain::{MAX_LEASED_BYTES, canonical_json},
    proto::tasks_v1::{
        Lease, LeaseTasksRequest, TaskStatus, worker_service_client::WorkerServiceClient,
    },
};
use serde_json::json;
use tonic::transport::Endpoint;

use crate::support::{
    Backend, BinaryServer, TestApp, TestDb, new_key, request, scrape_until, value,
};

/// Creates a task whose parameters hold about `bytes` bytes; returns its
/// id and the exact size of its parameters (canonical JSON), as the lease's
/// byte limit counts them.
async fn create_sized(app: &TestApp, i: usize, bytes: usize) -> (String, i64) {
    let parameters = json!({"i": i, "body": "x".repeat(bytes)});
    let size = canonical_json::to_string(&parameters).len() as i64;
    let task = app
        .create(Some(&new_key()), request("dense", "index", parameters))
        .await
        .expect("create")
        .into_inner();
    (task.task_id, size)
}

/// Polls sent at once, the `i`th on `apps[i % apps.len()]` asking for
/// `max_tasks[i]` tasks, without waiting; each poll's answer, in order.
async fn polls_at_once(apps: &[&TestApp], max_tasks: &[i32]) -> Vec<Vec<Lease>> {
    let barrier = Arc::new(tokio::sync::Barrier::new(max_tasks.len()));
    let polls: Vec<_> = max_tasks
        .iter()
        .enumerate()
        .map(|(i, &max_tasks)| {
            let mut workers = WorkerServiceClient::new(apps[i % apps.len()].channel.clone());
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let request = LeaseTasksRequest {
                    worker_id: format!("worker-{i}"),
                    actions: vec![],
                    max_tasks,
                    lease_duration: Some(prost_types::Duration {
                        seconds: 300,
                        nanos: 0,
                    }),
                    wait: None,
                };
                barrier.wait().await;
                workers.lease_tasks(request).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for poll in polls {
        answers.push(
            poll.await
                .expect("join")
                .expect("lease")
                .into_inner()
                .leases,
        );
    }
    answers
}

/// Checks one round of answers against the polls' limits and everything
/// leased before; adds the round's tasks to `leased`.
#[track_caller]
fn check_answers(
    answers: &[Vec<Lease>],
    max_tasks: &[i32],
    sizes: &HashMap<String, i64>,
    leased: &mut HashSet<String>,
) {
    for (answer, &max) in answers.iter().zip(max_tasks) {
        assert!(
            answer.len() <= max.max(1) as usize,
            "an answer of {} tasks to a poll of {max}",
            answer.len()
        );
        let bytes: i64 = answer
            .iter()
            .map(|lease| sizes[&lease.task.as_ref().expect("a task").task_id])
            .sum();
        assert!(
            answer.len() <= 1 || bytes <= MAX_LEASED_BYTES,
            "an answer of {} tasks holds {bytes} bytes of parameters",
            answer.len()
        );
        for lease in answer {
            let task_id = lease.task.as_ref().expect("a task").task_id.clone();
            assert!(leased.insert(task_id), "a task leased twice");
        }
    }
}

/// Polls of many sizes at once, round after round, over tasks of many
/// sizes: each answer within its own limits, no task twice, and every task
/// leased once the rounds end; each round leases something while tasks
/// remain.
async fn polls_at_once_stay_within_their_limits_whatever_the_sizes(backend: Backend) {
    const TASKS: usize = 40;
    const SIZES: [usize; 5] = [60_000, 20_000, 3_000, 40_000, 200];
    const MAX_TASKS: [i32; 8] = [1, 4, 16, 100, 7, 32, 0, 64];
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let mut sizes = HashMap::new();
    for i in 0..TASKS {
        let (task_id, size) = create_sized(&app, i, SIZES[i % SIZES.len()]).await;
        sizes.insert(task_id, size);
    }

    let mut leased = HashSet::new();
    let mut rounds = 0;
    while leased.len() < TASKS {
        rounds += 1;
        assert!(rounds <= 10, "{} of {TASKS} tasks leased", leased.len());
        let before = leased.len();
        let answers = polls_at_once(&[&app], &MAX_TASKS).await;
        check_answers(&answers, &MAX_TASKS, &sizes, &mut leased);
        assert!(
            leased.len() > before,
            "a round leased nothing while tasks waited"
        );
    }

    assert_eq!(leased, sizes.keys().cloned().collect::<HashSet<_>>());
}

/// Polls sent at once share batches; the tasks go to them in turn, each
/// task to one poll, no poll past its own limit, and every task is leased.
async fn polls_at_once_share_the_tasks_each_within_its_limit(backend: Backend) {
    const TASKS: usize = 30;
    const EACH: [i32; 12] = [3; 12];
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let mut sizes = HashMap::new();
    for i in 0..TASKS {
        let (task_id, size) = create_sized(&app, i, 10).await;
        sizes.insert(task_id, size);
    }

    let answers = polls_at_once(&[&app], &EACH).await;

    let mut leased = HashSet::new();
    check_answers(&answers, &EACH, &sizes, &mut leased);
    assert_eq!(leased.len(), TASKS, "every task leased");
    assert_eq!(
        db.count_tasks_with_status(TaskStatus::Running).await,
        TASKS as i64
    );
}

/// Polls cut by their byte limit leave the rest of the tasks unlocked: all
/// of them are leased by the polls sent with them.
async fn polls_cut_by_their_byte_limit_leave_no_task_behind(backend: Backend) {
    const TASKS: usize = 24;
    const POLLS: usize = 12;
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    // About 60 KB of parameters each: a lease answer holds 8 of them.
    let mut sizes = HashMap::new();
    for i in 0..TASKS {
        let (task_id, size) = create_sized(&app, i, 60_000).await;
        sizes.insert(task_id, size);
    }

    let max_tasks = [16; POLLS];
    let answers = polls_at_once(&[&app], &max_tasks).await;

    let mut leased = HashSet::new();
    check_answers(&answers, &max_tasks, &sizes, &mut leased);
    assert_eq!(leased.len(), TASKS, "every task leased by one of the polls");
}

/// Two instances on one database, their large-task polls sent at once,
/// round after round: a poll is answered empty only when no task is left
/// for it, never while tasks wait that the other instance's statement
/// locked and did not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_never_answer_a_poll_empty_while_tasks_wait() {
    const ROUNDS: usize = 12;
    // Two answers' worth: each poll can take 8 of these, and asks for 16.
    const TASKS: usize = 16;
    let db = TestDb::new(Backend::Postgres).await;
    let (front, back) = (TestApp::spawn(&db).await, TestApp::spawn(&db).await);
    let parameters = json!({"body": "x".repeat(60_000)});
    let size = canonical_json::to_string(&parameters).len() as i64;
    let max_tasks = [16, 16];

    let mut leased = HashSet::new();
    let mut sizes = HashMap::new();
    for round in 0..ROUNDS {
        db.insert_tasks_with("dense", parameters.clone(), TASKS)
            .await;
        let before = leased.len();

        let answers = polls_at_once(&[&front, &back], &max_tasks).await;

        for lease in answers.iter().flatten() {
            sizes.insert(lease.task.as_ref().expect("a task").task_id.clone(), size);
        }
        check_answers(&answers, &max_tasks, &sizes, &mut leased);
        let taken = leased.len() - before;
        let empty = answers.iter().filter(|a| a.is_empty()).count();
        assert!(
            empty == 0 || taken == TASKS,
            "round {round}: {empty} polls answered empty while {} tasks waited",
            TASKS - taken
        );
        // What a round left (none, when both polls were served) goes to
        // follow-up polls, so that each round starts afresh.
        while leased.len() < (round + 1) * TASKS {
            let follow = polls_at_once(&[&front], &[16]).await;
            for lease in follow.iter().flatten() {
                sizes.insert(lease.task.as_ref().expect("a task").task_id.clone(), size);
            }
            let was = leased.len();
            check_answers(&follow, &[16], &sizes, &mut leased);
            assert!(leased.len() > was, "a follow-up poll got nothing");
        }
    }
}

/// The tasks a poll's byte limit leaves behind wake the pollers that wait,
/// on every instance: they take them at once, not at their next re-read of
/// the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_a_cut_leaves_behind_wake_the_pollers_that_wait() {
    let db = TestDb::new(Backend::Postgres).await;
    // The waiting poller's instance runs as a process of its own, so that
    // its metrics count only this test's poll, and re-reads the database
    // only every minute.
    let (server, metrics) =
        BinaryServer::start_with_metrics_and(&db, &[("QUEUE_RECHECK_INTERVAL", "60s")]).await;
    let metrics = format!("http://{metrics}/metrics");
    let cutter = TestApp::spawn(&db).await;
    let channel = Endpoint::from_shared(server.url())
        .expect("url")
        .connect_lazy();
    let mut waiter = WorkerServiceClient::new(channel);
    let waiting = tokio::spawn(async move {
        waiter
            .lease_tasks(LeaseTasksRequest {
                worker_id: "waiter".into(),
                actions: vec![],
                max_tasks: 16,
                lease_duration: None,
                wait: Some(prost_types::Duration {
                    seconds: 50,
                    nanos: 0,
                }),
            })
            .await
    });
    scrape_until(&metrics, "the poll to wait for a task", |scrape| {
        value(scrape, "oncely_lease_polls_waiting", &[]) == Some(1.0)
    })
    .await;

    // 16 tasks no instance is told of, 8 to an answer; another instance's
    // poll takes what its byte limit allows and leaves the rest.
    db.insert_tasks_with("dense", json!({"body": "x".repeat(60_000)}), 16)
        .await;
    let taken = polls_at_once(&[&cutter], &[16]).await.remove(0);
    assert!(
        (1..16).contains(&taken.len()),
        "the first poll took {} tasks",
        taken.len()
    );

    let rest = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiting poll answers long before its wait or its re-read")
        .expect("join")
        .expect("lease")
        .into_inner()
        .leases;
    assert_eq!(
        rest.len() + taken.len(),
        16,
        "the waiting poll took the rest"
    );
}

/// Many tasks whose last allowed lease ran out, older than a queued one:
/// a poll for one task ends them all FAILED on its way and gets the queued
/// task, rather than an empty answer after a few rounds.
async fn a_poll_behind_many_tasks_past_their_last_attempt_still_gets_a_task(backend: Backend) {
    const EXPIRED: usize = 40;
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    for i in 0..=EXPIRED {
        create_sized(&app, i, 10).await;
    }
    // The default MAX_ATTEMPTS is 5: a lease of attempt 5 that ran out
    // ends its task.
    db.set_running(EXPIRED as i64, 5).await;
    db.make_leasable_now().await;

    let answer = polls_at_once(&[&app], &[1]).await.remove(0);

    assert_eq!(answer.len(), 1, "the queued task is leased");
    assert_eq!(
        db.count_tasks_with_status(TaskStatus::Failed).await,
        EXPIRED as i64
    );
}

/// Tasks an instance of the earlier version inserted (without their size,
/// during a rolling upgrade) are leased, and measured for the byte limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_the_earlier_version_inserted_are_leased_and_measured() {
    let db = TestDb::new(Backend::Postgres).await;
    let app = TestApp::spawn(&db).await;
    // The earlier version's insert: no parameters_bytes.
    sqlx::query(
        "INSERT INTO tasks (task_id, agent_id, action, parameters, status, create_time, \
                            update_time, available_at) \
         SELECT gen_random_uuid(), 'agent-7', 'index', \
                jsonb_build_object('i', i, 'body', repeat('x', 60000)), 1, now(), now(), now() \
         FROM generate_series(1, 16) AS i",
    )
    .execute(db.pg_pool())
    .await
    .expect("the earlier version inserts tasks");

    let first = polls_at_once(&[&app], &[16]).await.remove(0);
    let rest = polls_at_once(&[&app], &[16]).await.remove(0);

    assert!(
        (1..16).contains(&first.len()),
        "the byte limit cut the first answer: {} tasks",
        first.len()
    );
    assert_eq!(first.len() + rest.len(), 16, "every task leased");
}

conformance!(
    a_poll_behind_many_tasks_past_their_last_attempt_still_gets_a_task,
    polls_at_once_share_the_tasks_each_within_its_limit,
    polls_at_once_stay_within_their_limits_whatever_the_sizes,
    polls_cut_by_their_byte_limit_leave_no_task_behind,
);
