//! The exactly-once checker: reads the history the workload recorded and
//! the final database, and lists every anomaly. It does not trust the
//! server's own account of anything it can check from both sides.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Instant,
};

use oncely_client::json;
use tonic::Code;
use uuid::Uuid;

// `super::`, not `crate::`: tests/api/chaos_checker.rs includes this file
// and history.rs to test the checker on histories made to break each rule.
use super::history::{Answer, History, KeyRef, TaskRow};

/// One broken promise.
#[derive(Debug, Clone)]
pub(crate) struct Anomaly {
    pub(crate) kind: &'static str,
    pub(crate) detail: String,
}

/// Task statuses as stored.
const QUEUED: i64 = 1;
const RUNNING: i64 = 2;
const SUCCEEDED: i64 = 3;

/// What a database that loses acknowledged commits (asynchronous
/// replication failing over, a restore from backup) makes the checker see
/// even though oncely did all it could: work acknowledged on the old
/// history is gone, and a retry makes it again. Every other kind, and
/// above all an answer naming a task the database no longer held when the
/// call was made, is oncely's own fault whatever the database.
pub(crate) const LOST_COMMITS_EXPLAIN: &[&str] = &[
    "acknowledged create missing",
    "created twice",
    "replay differs from the first answer",
    "duplicate task",
    "stored task differs from the request",
    "valid request refused",
    "reused key refused with the wrong code",
    "reused key accepted",
    "completion lost",
    "completed twice",
    "completed under a superseded lease",
    "completion answered another result",
    "two leases of one attempt",
    "leases overlap",
    "lease times go backwards",
    "attempts undercounted",
    "result from no lease",
    "stored result is not the acknowledged one",
];

/// How far apart two of the server's clock readings may be and still be
/// read as ordered: timestamps go through the database at microseconds.
const CLOCK_SLACK_US: i128 = 1_000;

pub(crate) fn check(history: &History, rows: &[TaskRow]) -> Vec<Anomaly> {
    let mut anomalies = Vec::new();
    let mut found = |kind: &'static str, detail: String| {
        anomalies.push(Anomaly { kind, detail });
    };
    let requests = history.requests.lock().expect("lock");

    // The stored tasks, by the key their parameters name.
    let mut by_key: HashMap<KeyRef, Vec<&TaskRow>> = HashMap::new();
    for row in rows {
        let key = key_of(&row.parameters);
        match key.filter(|k| requests.contains_key(k)) {
            Some(key) => by_key.entry(key).or_default().push(row),
            None => found(
                "unknown task",
                format!("task {} names no key of the run", row.task_id),
            ),
        }
    }
    for (key, tasks) in &by_key {
        if tasks.len() > 1 {
            let ids: Vec<_> = tasks.iter().map(|t| t.task_id.as_str()).collect();
            found("duplicate task", format!("{key:?} has tasks {ids:?}"));
        }
        // The stored task is the request first sent, not a variant.
        let request = &requests[key];
        let expected = serde_json::Value::Object(json::from_struct(
            request.parameters.as_ref().expect("parameters"),
        ));
        for task in tasks {
            if task.agent_id != request.agent_id
                || task.action != request.action
                || task.parameters != expected
            {
                found(
                    "stored task differs from the request",
                    format!(
                        "task {} of {key:?} holds {} {} {}, sent {} {} {expected}",
                        task.task_id,
                        task.agent_id,
                        task.action,
                        task.parameters,
                        request.agent_id,
                        request.action
                    ),
                );
            }
        }
    }

    // Every OK answer names the key's one task, and they all agree.
    let creates = history.creates.lock().expect("lock");
    let mut first_answer = HashMap::new();
    let mut created = HashMap::<KeyRef, u32>::new();
    // Per key, when an answer first named the task the database keeps; and
    // the OK answers naming a task it does not.
    let mut kept_since = HashMap::new();
    let mut unheld = Vec::new();
    for attempt in creates.iter() {
        let answer = match &attempt.answer {
            Answer::Ok(answer) => answer,
            // The request a key stands for is valid: nothing may refuse it.
            Answer::Refused(code, message) if !attempt.variant => {
                found(
                    "valid request refused",
                    format!("{:?} answered {code:?}: {message}", attempt.key),
                );
                continue;
            }
            Answer::Refused(code, message) if *code != Code::FailedPrecondition => {
                found(
                    "reused key refused with the wrong code",
                    format!("{:?} answered {code:?}: {message}", attempt.key),
                );
                continue;
            }
            Answer::Refused(..) | Answer::Unknown(_) => continue,
        };
        if attempt.variant {
            found(
                "reused key accepted",
                format!(
                    "{:?} sent with other parameters answered OK with task {}",
                    attempt.key, answer.task.task_id
                ),
            );
            continue;
        }
        let stored = by_key.get(&attempt.key).map(Vec::as_slice).unwrap_or(&[]);
        if stored.iter().any(|t| t.task_id == answer.task.task_id) {
            kept_since
                .entry(attempt.key)
                .and_modify(|since: &mut Instant| {
                    *since = (*since).min(attempt.received);
                })
                .or_insert(attempt.received);
        } else {
            found(
                "acknowledged create missing",
                format!(
                    "{:?} was answered with task {}, which is not stored",
                    attempt.key, answer.task.task_id
                ),
            );
            unheld.push((attempt, &answer.task.task_id));
        }
        if !answer.replayed {
            *created.entry(attempt.key).or_default() += 1;
        }
        match first_answer.get(&attempt.key) {
            None => {
                first_answer.insert(attempt.key, &answer.task);
            }
            Some(first) if **first != answer.task => found(
                "replay differs from the first answer",
                format!(
                    "{:?}: {:?} then {:?}",
                    attempt.key, first.task_id, answer.task.task_id
                ),
            ),
            Some(_) => {}
        }
    }
    for (key, count) in created {
        if count > 1 {
            found(
                "created twice",
                format!("{key:?} was answered {count} times as newly created"),
            );
        }
    }

    // Once an answer named the task the database keeps, the database held
    // it (and the key's record pointing to it) from then on: a call sent
    // after that which answers another task answered from something other
    // than the database, such as memory of a history since lost.
    for (attempt, task_id) in unheld {
        if let Some(since) = kept_since.get(&attempt.key)
            && attempt.sent > *since
        {
            found(
                "answered a task the database no longer held",
                format!(
                    "{:?} was answered with task {task_id}, though the task the database keeps was acknowledged {:?} before the call",
                    attempt.key,
                    attempt.sent - *since,
                ),
            );
        }
    }

    for message in history.internal.lock().expect("lock").iter() {
        found("INTERNAL answer", message.clone());
    }
    check_leases(history, rows, &mut found);
    for row in rows {
        if row.status == QUEUED || row.status == RUNNING {
            found(
                "task left unfinished",
                format!(
                    "task {} is still {} (attempt {}) after the drain",
                    row.task_id,
                    if row.status == QUEUED {
                        "queued"
                    } else {
                        "leased"
                    },
                    row.attempt
                ),
            );
        }
    }
    anomalies
}

/// Leases never overlap, a completion counts once, and the stored result
/// is the one the completing lease sent.
fn check_leases(history: &History, rows: &[TaskRow], found: &mut impl FnMut(&'static str, String)) {
    let grants = history.grants.lock().expect("lock");
    let renewals = history.renewals.lock().expect("lock");
    let completions = history.completions.lock().expect("lock");
    let fails: HashSet<String> = history
        .fails
        .lock()
        .expect("lock")
        .iter()
        .cloned()
        .collect();

    let mut expiry: HashMap<&str, i128> = HashMap::new();
    for grant in grants.iter() {
        expiry.insert(&grant.token, grant.expires_us);
    }
    for (token, expires) in renewals.iter() {
        if let Some(e) = expiry.get_mut(token.as_str()) {
            *e = (*e).max(*expires);
        }
    }
    let mut completed: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
    for completion in completions.iter() {
        if let Answer::Ok(task) = &completion.answer {
            completed
                .entry(&completion.task_id)
                .or_default()
                .insert(&completion.token);
            let returned = task
                .result
                .as_ref()
                .map(|r| serde_json::Value::Object(json::from_struct(r)));
            if returned.as_ref() != Some(&completion.result) {
                found(
                    "completion answered another result",
                    format!(
                        "task {} completed with {} answered {returned:?}",
                        completion.task_id, completion.result
                    ),
                );
            }
        }
    }

    let mut by_task: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    for grant in grants.iter() {
        by_task.entry(&grant.task_id).or_default().push(grant);
    }
    let rows: HashMap<&str, &TaskRow> = rows.iter().map(|r| (r.task_id.as_str(), r)).collect();
    for (task_id, mut leases) in by_task {
        // In attempt order, which the server alone sets; its clock must
        // agree.
        leases.sort_by_key(|g| (g.attempt, g.granted_us));
        let mut attempts = HashSet::new();
        for grant in &leases {
            if !attempts.insert(grant.attempt) {
                found(
                    "two leases of one attempt",
                    format!("task {task_id} attempt {} was leased twice", grant.attempt),
                );
            }
        }
        let done = completed.get(task_id);
        for pair in leases.windows(2) {
            let (first, next) = (pair[0], pair[1]);
            if next.granted_us < first.granted_us {
                found(
                    "lease times go backwards",
                    format!(
                        "task {task_id}: attempt {} granted at {}, attempt {} at {}",
                        first.attempt, first.granted_us, next.attempt, next.granted_us
                    ),
                );
            }
            // Completing ends the task, and a new lease ends the last one:
            // either way, a completed lease is the task's last.
            if done.is_some_and(|tokens| tokens.contains(first.token.as_str())) {
                found(
                    "completed under a superseded lease",
                    format!(
                        "task {task_id} was completed under lease {} and leased again as {}",
                        first.token, next.token
                    ),
                );
            }
            // A failed attempt may be leased again at once; otherwise the
            // next lease waits for the last known expiry of this one.
            let until = expiry[first.token.as_str()];
            if !fails.contains(&first.token) && next.granted_us + CLOCK_SLACK_US < until {
                found(
                    "leases overlap",
                    format!(
                        "task {task_id} leased at {} while lease {} ran until {until}",
                        next.granted_us, first.token
                    ),
                );
            }
        }
        let last = leases
            .iter()
            .map(|g| i64::from(g.attempt))
            .max()
            .unwrap_or(0);
        if let Some(row) = rows.get(task_id)
            && last > row.attempt
        {
            found(
                "attempts undercounted",
                format!(
                    "task {task_id} was leased as attempt {last}, stored attempt {}",
                    row.attempt
                ),
            );
        }
    }

    let granted: HashMap<(&str, &str), i32> = grants
        .iter()
        .map(|g| ((g.task_id.as_str(), g.token.as_str()), g.attempt))
        .collect();
    for (task_id, tokens) in &completed {
        if tokens.len() > 1 {
            found(
                "completed twice",
                format!("task {task_id} completed under leases {tokens:?}"),
            );
        }
        match rows.get(task_id) {
            Some(row) if row.status == SUCCEEDED => {}
            Some(row) => found(
                "completion lost",
                format!(
                    "task {task_id} was completed (OK) but is stored with status {}",
                    row.status
                ),
            ),
            None => found(
                "completion lost",
                format!("task {task_id} was completed but is not stored"),
            ),
        }
    }
    for row in rows.values().filter(|r| r.status == SUCCEEDED) {
        let token = row
            .result
            .as_ref()
            .and_then(|r| r.get("token"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        match granted.get(&(row.task_id.as_str(), token)) {
            None => found(
                "result from no lease",
                format!("task {} holds result {:?}", row.task_id, row.result),
            ),
            // Even when the lease that replaced it was never seen (its
            // answer lost): the completing lease is the task's last.
            Some(&attempt) if i64::from(attempt) != row.attempt => found(
                "completed under a superseded lease",
                format!(
                    "task {} holds the result of attempt {attempt}, stored attempt {}",
                    row.task_id, row.attempt
                ),
            ),
            Some(_) => {}
        }
        if let Some(tokens) = completed.get(row.task_id.as_str())
            && !tokens.contains(token)
        {
            found(
                "stored result is not the acknowledged one",
                format!(
                    "task {} holds the result of lease {token}, completed under {tokens:?}",
                    row.task_id
                ),
            );
        }
    }
}

/// The key a stored task's parameters name.
fn key_of(parameters: &serde_json::Value) -> Option<KeyRef> {
    let text = |member: &str| {
        parameters
            .get(member)
            .and_then(serde_json::Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
    };
    text("key")
        .map(KeyRef::Keyed)
        .or_else(|| text("fingerprint").map(KeyRef::Keyless))
}
