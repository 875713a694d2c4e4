//! The chaos harness's exactly-once checker (tests/chaos/checker.rs), on
//! histories made to break each of its rules: each must be reported, and a
//! clean history must pass. The harness itself runs by hand and in
//! `.ci/run` (`cargo test --test chaos`); this keeps its checker honest.

#[allow(dead_code)]
#[path = "../chaos/history.rs"]
mod history;

#[allow(dead_code)]
#[path = "../chaos/checker.rs"]
mod checker;

use std::time::{Duration, Instant};

use history::{Answer, Completion, CreateAttempt, Created, Grant, History, KeyRef, TaskRow};
use oncely::proto::tasks_v1::{CreateTaskRequest, Task};
use oncely_client::json;
use serde_json::json;
use tonic::Code;
use uuid::Uuid;

const TASK: &str = "6f1c1a52-0000-4000-8000-000000000001";
const OTHER_TASK: &str = "6f1c1a52-0000-4000-8000-000000000002";
const LEASE: &str = "lease-1";
const SECOND_LEASE: &str = "lease-2";

/// One key, its task created, replayed once, leased once and completed: a
/// history without anomalies, which each test then breaks in one way.
struct Scenario {
    key: KeyRef,
    history: History,
    rows: Vec<TaskRow>,
}

fn request(key: KeyRef) -> CreateTaskRequest {
    let (member, id) = key.member();
    CreateTaskRequest {
        agent_id: "agent".into(),
        action: "chaos.deliver".into(),
        parameters: Some(json::to_struct(json!({member: id.to_string(), "amount": 7})).unwrap()),
    }
}

fn answer(key: KeyRef, task_id: &str) -> Task {
    let request = request(key);
    Task {
        task_id: task_id.into(),
        agent_id: request.agent_id,
        action: request.action,
        parameters: request.parameters,
        ..Task::default()
    }
}

fn row(key: KeyRef, task_id: &str, status: i64, token: Option<&str>) -> TaskRow {
    let request = request(key);
    TaskRow {
        task_id: task_id.into(),
        agent_id: request.agent_id,
        action: request.action,
        parameters: serde_json::Value::Object(json::from_struct(&request.parameters.unwrap())),
        status,
        result: token.map(|t| json!({"token": t})),
        attempt: 1,
    }
}

fn grant(task_id: &str, token: &str, attempt: i32, granted_us: i128) -> Grant {
    Grant {
        task_id: task_id.into(),
        token: token.into(),
        attempt,
        granted_us,
        expires_us: granted_us + 2_000_000,
    }
}

fn completion(task_id: &str, token: &str) -> Completion {
    let result = json!({"token": token});
    Completion {
        task_id: task_id.into(),
        token: token.into(),
        result: result.clone(),
        answer: Answer::Ok(Task {
            task_id: task_id.into(),
            result: Some(json::to_struct(result).unwrap()),
            ..Task::default()
        }),
    }
}

impl Scenario {
    fn clean() -> Self {
        let key = KeyRef::Keyed(Uuid::new_v4());
        let scenario = Self {
            key,
            history: History::default(),
            rows: vec![row(key, TASK, 3, Some(LEASE))],
        };
        scenario
            .history
            .requests
            .lock()
            .unwrap()
            .insert(key, request(key));
        scenario.create(Answer::Unknown("no answer within the deadline".into()));
        scenario.create_ok(TASK, false);
        scenario.create_ok(TASK, true);
        scenario.grant(grant(TASK, LEASE, 1, 1_000_000));
        scenario.complete(completion(TASK, LEASE));
        scenario
    }

    /// An attempt answered before the next one was sent.
    fn create(&self, answer: Answer<Created>) {
        let now = Instant::now();
        self.create_between(answer, now, now);
    }

    fn create_between(&self, answer: Answer<Created>, sent: Instant, received: Instant) {
        self.history.creates.lock().unwrap().push(CreateAttempt {
            key: self.key,
            variant: false,
            answer,
            sent,
            received,
        });
    }

    fn create_ok(&self, task_id: &str, replayed: bool) {
        self.create(Answer::Ok(Created {
            task: answer(self.key, task_id),
            replayed,
        }));
    }

    fn grant(&self, grant: Grant) {
        self.history.grants.lock().unwrap().push(grant);
    }

    fn complete(&self, completion: Completion) {
        self.history.completions.lock().unwrap().push(completion);
    }

    /// The kinds of anomaly the checker reports.
    fn anomalies(&self) -> Vec<&'static str> {
        checker::check(&self.history, &self.rows)
            .into_iter()
            .map(|a| a.kind)
            .collect()
    }

    fn assert_reports(&self, kind: &str) {
        let found = self.anomalies();
        assert!(found.contains(&kind), "expected {kind:?}, found {found:?}");
    }
}

#[test]
fn a_clean_history_has_no_anomaly() {
    assert_eq!(Scenario::clean().anomalies(), Vec::<&str>::new());
}

#[test]
fn a_second_task_for_a_key_is_a_duplicate() {
    let mut s = Scenario::clean();
    s.rows.push(row(s.key, OTHER_TASK, 1, None));
    s.assert_reports("duplicate task");
}

#[test]
fn a_second_keyless_task_for_a_fingerprint_is_a_duplicate() {
    let mut s = Scenario::clean();
    let keyless = KeyRef::Keyless(Uuid::new_v4());
    s.history
        .requests
        .lock()
        .unwrap()
        .insert(keyless, request(keyless));
    s.rows.push(row(keyless, OTHER_TASK, 4, None));
    assert_eq!(s.anomalies(), Vec::<&str>::new());
    s.rows.push(row(
        keyless,
        "6f1c1a52-0000-4000-8000-000000000003",
        4,
        None,
    ));
    s.assert_reports("duplicate task");
}

#[test]
fn an_acknowledged_task_that_is_not_stored_is_missing() {
    let mut s = Scenario::clean();
    s.rows.clear();
    s.assert_reports("acknowledged create missing");
}

#[test]
fn a_stored_task_must_be_the_request_sent() {
    let mut s = Scenario::clean();
    s.rows[0].parameters["amount"] = json!(8);
    s.assert_reports("stored task differs from the request");
}

#[test]
fn a_replay_must_name_the_same_task() {
    let s = Scenario::clean();
    s.create_ok(OTHER_TASK, true);
    s.assert_reports("replay differs from the first answer");
}

#[test]
fn a_task_lost_with_its_history_is_not_answered_after_the_kept_one() {
    // A failover lost the first task (acknowledged, then gone); a retry
    // created the one the database keeps.
    let lost = || {
        let mut s = Scenario::clean();
        s.history.creates.lock().unwrap().clear();
        s.rows = vec![row(s.key, OTHER_TASK, 3, Some(LEASE))];
        s.history.completions.lock().unwrap()[0] = completion(OTHER_TASK, LEASE);
        s.history.grants.lock().unwrap()[0] = grant(OTHER_TASK, LEASE, 1, 1_000_000);
        s.create_ok(TASK, false);
        s.create_ok(OTHER_TASK, false);
        s
    };
    let s = lost();
    assert!(
        !s.anomalies()
            .contains(&"answered a task the database no longer held"),
        "{:?}",
        s.anomalies()
    );

    // An answer of the lost task from a call made before the kept one was
    // acknowledged, arriving late (its instance was paused): explained by
    // the lost commit.
    let s = lost();
    let before = Instant::now() - Duration::from_secs(1);
    s.create_between(
        Answer::Ok(Created {
            task: answer(s.key, TASK),
            replayed: true,
        }),
        before,
        Instant::now(),
    );
    assert!(
        !s.anomalies()
            .contains(&"answered a task the database no longer held")
    );

    // A call made after it that answers the lost task answered from memory.
    let s = lost();
    s.create_ok(TASK, true);
    s.assert_reports("answered a task the database no longer held");
}

#[test]
fn only_one_answer_may_say_created() {
    let s = Scenario::clean();
    s.create_ok(TASK, false);
    s.assert_reports("created twice");
}

#[test]
fn a_reused_key_must_be_refused_as_such() {
    let s = Scenario::clean();
    let reused = |answer| CreateAttempt {
        key: s.key,
        variant: true,
        answer,
        sent: Instant::now(),
        received: Instant::now(),
    };
    let mut creates = s.history.creates.lock().unwrap();
    creates.push(reused(Answer::Refused(
        Code::FailedPrecondition,
        "reused".into(),
    )));
    drop(creates);
    assert_eq!(s.anomalies(), Vec::<&str>::new());

    let mut creates = s.history.creates.lock().unwrap();
    creates.push(reused(Answer::Refused(Code::InvalidArgument, "bad".into())));
    creates.push(reused(Answer::Ok(Created {
        task: answer(s.key, TASK),
        replayed: true,
    })));
    drop(creates);
    s.assert_reports("reused key refused with the wrong code");
    s.assert_reports("reused key accepted");
}

#[test]
fn the_request_a_key_stands_for_is_never_refused() {
    let s = Scenario::clean();
    s.create(Answer::Refused(Code::FailedPrecondition, "reused".into()));
    s.assert_reports("valid request refused");
}

#[test]
fn a_lease_granted_before_the_last_one_ran_out_overlaps() {
    let mut s = Scenario::clean();
    s.history.completions.lock().unwrap().clear();
    s.rows[0].attempt = 2;
    s.rows[0].result = Some(json!({"token": SECOND_LEASE}));
    // Granted after the first ran out: fine.
    s.grant(grant(TASK, SECOND_LEASE, 2, 3_000_001));
    s.complete(completion(TASK, SECOND_LEASE));
    assert_eq!(s.anomalies(), Vec::<&str>::new());

    // A renewal moved the first one's end past the second grant.
    s.history
        .renewals
        .lock()
        .unwrap()
        .push((LEASE.into(), 4_000_000));
    s.assert_reports("leases overlap");

    // Unless the first attempt was failed: then it may be leased at once.
    s.history.fails.lock().unwrap().push(LEASE.into());
    assert_eq!(s.anomalies(), Vec::<&str>::new());
}

#[test]
fn one_attempt_is_leased_once() {
    let mut s = Scenario::clean();
    s.rows[0].attempt = 2;
    s.history.fails.lock().unwrap().push(LEASE.into());
    s.grant(grant(TASK, SECOND_LEASE, 1, 1_500_000));
    s.assert_reports("two leases of one attempt");
}

#[test]
fn only_the_last_lease_of_a_task_completes_it() {
    let mut s = Scenario::clean();
    s.rows[0].attempt = 2;
    s.grant(grant(TASK, SECOND_LEASE, 2, 3_500_000));
    s.assert_reports("completed under a superseded lease");
}

#[test]
fn leases_are_counted_in_attempts() {
    let s = Scenario::clean();
    s.grant(grant(TASK, SECOND_LEASE, 2, 3_500_000));
    s.assert_reports("attempts undercounted");
}

#[test]
fn a_task_is_completed_under_one_lease() {
    let mut s = Scenario::clean();
    s.rows[0].attempt = 2;
    s.grant(grant(TASK, SECOND_LEASE, 2, 3_500_000));
    s.complete(completion(TASK, SECOND_LEASE));
    s.assert_reports("completed twice");
}

#[test]
fn an_acknowledged_completion_is_stored() {
    let mut s = Scenario::clean();
    s.rows[0].status = 4;
    s.assert_reports("completion lost");
}

#[test]
fn a_stored_result_comes_from_a_lease() {
    let mut s = Scenario::clean();
    s.rows[0].result = Some(json!({"token": "never-granted"}));
    s.assert_reports("result from no lease");
    s.assert_reports("stored result is not the acknowledged one");
}

#[test]
fn a_completion_answers_its_own_result() {
    let s = Scenario::clean();
    let mut wrong = completion(TASK, LEASE);
    wrong.result = json!({"token": LEASE, "extra": true});
    s.complete(wrong);
    s.assert_reports("completion answered another result");
}

#[test]
fn no_task_is_left_queued_or_leased() {
    for status in [1, 2] {
        let mut s = Scenario::clean();
        s.rows[0].status = status;
        s.assert_reports("task left unfinished");
    }
}

#[test]
fn a_task_of_no_key_is_reported() {
    let mut s = Scenario::clean();
    s.rows.push(TaskRow {
        parameters: json!({"amount": 1}),
        ..row(s.key, OTHER_TASK, 3, None)
    });
    s.assert_reports("unknown task");
}

#[test]
fn an_internal_answer_is_reported() {
    let s = Scenario::clean();
    s.history
        .internal
        .lock()
        .unwrap()
        .push("database error".into());
    s.assert_reports("INTERNAL answer");
}

#[test]
fn a_result_from_an_earlier_attempt_is_superseded_even_unseen() {
    let mut s = Scenario::clean();
    // Attempt 2 was granted, but its answer never reached the worker.
    s.rows[0].attempt = 2;
    s.assert_reports("completed under a superseded lease");
}

#[test]
fn the_highest_attempt_leased_is_counted() {
    // Two leases seen, stored attempt 2, but one of them was attempt 3.
    let mut s = Scenario::clean();
    s.rows[0].attempt = 2;
    s.history.fails.lock().unwrap().push(LEASE.into());
    s.grant(grant(TASK, SECOND_LEASE, 3, 3_500_000));
    s.assert_reports("attempts undercounted");
}

#[test]
fn a_later_attempt_is_not_granted_earlier() {
    let mut s = Scenario::clean();
    s.rows[0].attempt = 2;
    s.rows[0].result = Some(json!({"token": SECOND_LEASE}));
    s.history.completions.lock().unwrap().clear();
    s.history.fails.lock().unwrap().push(LEASE.into());
    s.grant(grant(TASK, SECOND_LEASE, 2, 500_000));
    s.complete(completion(TASK, SECOND_LEASE));
    s.assert_reports("lease times go backwards");
}
