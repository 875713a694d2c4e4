//! The arguments of the WorkerService calls, parsed.

use std::time::Duration;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::{
    canonical_json,
    parameters::{Limits, field_to_json},
    requests::{MAX_WAIT, TaskId, bounded_duration},
    task::check_name,
    violation::{FieldViolation, echo},
};
use crate::proto::tasks_v1::{
    CompleteTaskRequest, FailTaskRequest, LeaseTasksRequest, RenewLeaseRequest,
};

/// The most tasks one LeaseTasks call hands out.
pub const MAX_LEASED_TASKS: usize = 100;
/// The most bytes of parameters (as JSON) one lease answer carries; past
/// it the answer holds fewer tasks (always at least one). Protobuf can be
/// 5.5 times bigger than JSON (an array of digits), so the answer stays
/// under the 4 MiB clients accept by default.
pub const MAX_LEASED_BYTES: i64 = 512 * 1024;
/// The shortest lease.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// The longest lease.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// How much of an error message is kept, in bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 8 * 1024;
/// The longest `retry_after`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// A LeaseTasks request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseQuery {
    /// Who asks.
    pub worker_id: String,
    /// The actions wanted; empty for any.
    pub actions: Vec<String>,
    /// How many tasks at most, 1 to [`MAX_LEASED_TASKS`].
    pub max_tasks: usize,
    /// How long each lease lasts.
    pub lease_duration: Duration,
    /// How long to wait for a task; zero for not at all.
    pub wait: Duration,
}

impl LeaseQuery {
    /// Validates a request, reporting every violation at once; an unset
    /// `lease_duration` is `default_lease`.
    pub fn parse(
        request: LeaseTasksRequest,
        default_lease: Duration,
    ) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        violations.extend(check_name("worker_id", &request.worker_id).err());
        for (i, action) in request.actions.iter().enumerate() {
            if let Err(v) = check_name("actions", action) {
                violations.push(FieldViolation::new(format!("actions[{i}]"), v.description));
            }
        }
        let max_tasks = match usize::try_from(request.max_tasks) {
            Ok(0) => 1,
            Ok(n) if n <= MAX_LEASED_TASKS => n,
            _ => {
                violations.push(FieldViolation::new(
                    "max_tasks",
                    format!(
                        "max_tasks is {}; send 0 for one task, or up to {MAX_LEASED_TASKS}",
                        request.max_tasks
                    ),
                ));
                0
            }
        };
        let lease_duration = lease_duration(request.lease_duration, default_lease)
            .map_err(|v| violations.push(v))
            .unwrap_or_default();
        let wait = match request.wait {
            None => Duration::ZERO,
            Some(d) => bounded_duration("wait", d, Duration::ZERO, MAX_WAIT)
                .map_err(|v| violations.push(v))
                .unwrap_or_default(),
        };
        if !violations.is_empty() {
            return Err(violations);
        }
        Ok(Self {
            worker_id: request.worker_id,
            actions: request.actions,
            max_tasks,
            lease_duration,
            wait,
        })
    }
}

fn lease_duration(
    requested: Option<prost_types::Duration>,
    default_lease: Duration,
) -> Result<Duration, FieldViolation> {
    match requested {
        None => Ok(default_lease),
        Some(d) => bounded_duration("lease_duration", d, MIN_LEASE, MAX_LEASE),
    }
}

/// The lease a call is about: the task and the token its lease gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRef {
    /// The task.
    pub task_id: TaskId,
    /// The lease's token.
    pub token: Uuid,
}

impl LeaseRef {
    fn parse(task_id: &str, token: &str, violations: &mut Vec<FieldViolation>) -> Option<Self> {
        let task_id = TaskId::parse_field("task_id", task_id)
            .map_err(|v| violations.push(v))
            .ok();
        let token = Uuid::parse_str(token)
            .map_err(|_| {
                violations.push(FieldViolation::new(
                    "lease_token",
                    format!(
                        "lease_token {} is not one this service issued; send the lease_token of the task's Lease",
                        echo(token)
                    ),
                ))
            })
            .ok();
        Some(Self {
            task_id: task_id?,
            token: token?,
        })
    }
}

/// A RenewLease request, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// The lease.
    pub lease: LeaseRef,
    /// How long from now it lasts.
    pub lease_duration: Duration,
}

impl Renewal {
    /// Validates a request; an unset `lease_duration` is `default_lease`.
    pub fn parse(
        request: &RenewLeaseRequest,
        default_lease: Duration,
    ) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let lease = LeaseRef::parse(&request.task_id, &request.lease_token, &mut violations);
        let lease_duration = lease_duration(request.lease_duration, default_lease)
            .map_err(|v| violations.push(v))
            .ok();
        match (lease, lease_duration) {
            (Some(lease), Some(lease_duration)) if violations.is_empty() => Ok(Self {
                lease,
                lease_duration,
            }),
            _ => Err(violations),
        }
    }
}

/// A CompleteTask request, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The lease.
    pub lease: LeaseRef,
    /// The result (an unset `result` is the empty object).
    pub result: Map<String, Value>,
    /// `result` in canonical JSON form, as stored.
    pub result_json: String,
}

impl Completion {
    /// Validates a request: the result must have a JSON form and fit the
    /// same size limit as `parameters`.
    pub fn parse(
        request: &CompleteTaskRequest,
        limits: &Limits,
    ) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let lease = LeaseRef::parse(&request.task_id, &request.lease_token, &mut violations);
        let result = match request.result.as_ref().map(|r| field_to_json("result", r)) {
            None => Some(Map::new()),
            Some(Ok(map)) => Some(map),
            Some(Err(violation)) => {
                violations.push(violation);
                None
            }
        };
        let result_json = result
            .as_ref()
            .map(canonical_json::object_to_string)
            .unwrap_or_default();
        if result_json.len() > limits.max_parameters_bytes {
            violations.push(FieldViolation::new(
                "result",
                format!(
                    "result is {} bytes as canonical JSON; at most {} are allowed",
                    result_json.len(),
                    limits.max_parameters_bytes
                ),
            ));
        }
        match (lease, result) {
            (Some(lease), Some(result)) if violations.is_empty() => Ok(Self {
                lease,
                result,
                result_json,
            }),
            _ => Err(violations),
        }
    }
}

/// A FailTask request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The lease.
    pub lease: LeaseRef,
    /// What went wrong, cut to [`MAX_ERROR_MESSAGE_BYTES`], NUL replaced.
    pub message: String,
    /// Whether retrying cannot help.
    pub permanent: bool,
    /// When to retry at the earliest; `None` for the server's backoff.
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// Validates a request. The message is kept whatever it holds, only cut
    /// to size: recording a failure must not fail on its description.
    pub fn parse(request: &FailTaskRequest) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let lease = LeaseRef::parse(&request.task_id, &request.lease_token, &mut violations);
        let retry_after = request
            .retry_after
            .map(|d| bounded_duration("retry_after", d, Duration::ZERO, MAX_RETRY_AFTER))
            .transpose()
            .map_err(|v| violations.push(v))
            .ok()
            .flatten();
        match lease {
            Some(lease) if violations.is_empty() => Ok(Self {
                lease,
                message: storable_message(&request.error_message),
                permanent: request.permanent,
                retry_after,
            }),
            _ => Err(violations),
        }
    }
}

/// `text` cut to [`MAX_ERROR_MESSAGE_BYTES`] at a character boundary, with
/// NUL (which the databases cannot hold) replaced by U+FFFD.
fn storable_message(text: &str) -> String {
    let mut end = text.len().min(MAX_ERROR_MESSAGE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace('\0', "\u{fffd}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto_duration(seconds: i64) -> prost_types::Duration {
        prost_types::Duration { seconds, nanos: 0 }
    }

    #[test]
    fn a_lease_request_gets_defaults_and_limits() {
        let query = LeaseQuery::parse(
            LeaseTasksRequest {
                worker_id: "w".into(),
                ..Default::default()
            },
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(query.max_tasks, 1);
        assert_eq!(query.lease_duration, Duration::from_secs(30));
        assert_eq!(query.wait, Duration::ZERO);

        let bad = LeaseQuery::parse(
            LeaseTasksRequest {
                worker_id: String::new(),
                actions: vec![String::new()],
                max_tasks: 101,
                lease_duration: Some(proto_duration(0)),
                wait: Some(proto_duration(61)),
            },
            Duration::from_secs(30),
        )
        .unwrap_err();
        let fields: Vec<_> = bad.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "worker_id",
                "actions[0]",
                "max_tasks",
                "lease_duration",
                "wait"
            ]
        );
    }

    #[test]
    fn lease_references_name_each_bad_part() {
        let bad = Renewal::parse(
            &RenewLeaseRequest {
                task_id: "x".into(),
                lease_token: "y".into(),
                lease_duration: None,
            },
            Duration::from_secs(30),
        )
        .unwrap_err();
        let fields: Vec<_> = bad.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["task_id", "lease_token"]);
    }

    #[test]
    fn error_messages_are_kept_but_cut_to_size() {
        assert_eq!(storable_message("a\0b"), "a\u{fffd}b");
        let long = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        let kept = storable_message(&long);
        assert!(kept.len() <= MAX_ERROR_MESSAGE_BYTES && kept.len() > 8000);
    }
}
