//! A task: the validated request that creates one ([`NewTask`]), the task
//! as stored ([`TaskRecord`]), and the protobuf `Task` both are shown as.

use chrono::{DateTime, Utc};
use oncely_client::json::object_to_struct;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{
    canonical_json,
    parameters::{Limits, NUL, struct_to_json},
    status::StoredStatus,
    violation::FieldViolation,
};
use crate::proto::tasks_v1::{CreateTaskRequest, Task};

/// The longest `agent_id` or `action`, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// A `CreateTaskRequest` that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// The owning agent; 1 to 255 bytes.
    pub agent_id: String,
    /// The action; 1 to 255 bytes.
    pub action: String,
    /// The parameters as JSON (an unset `parameters` is the empty object).
    pub parameters: Map<String, Value>,
    /// `parameters` in canonical JSON form, as stored and fingerprinted.
    pub parameters_json: String,
}

impl NewTask {
    /// Validates a request, reporting every violation at once.
    pub fn parse(request: CreateTaskRequest, limits: &Limits) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        violations.extend(check_name("agent_id", &request.agent_id).err());
        violations.extend(check_name("action", &request.action).err());

        let parameters = match request.parameters.as_ref().map(struct_to_json) {
            None => Some(Map::new()),
            Some(Ok(map)) => Some(map),
            Some(Err(violation)) => {
                violations.push(violation);
                None
            }
        };
        let mut parameters_json = String::new();
        if let Some(map) = &parameters {
            parameters_json = canonical_json::object_to_string(map);
            if parameters_json.len() > limits.max_parameters_bytes {
                violations.push(FieldViolation::new(
                    "parameters",
                    format!(
                        "parameters are {} bytes as canonical JSON; at most {} are allowed",
                        parameters_json.len(),
                        limits.max_parameters_bytes
                    ),
                ));
            }
        }
        match parameters {
            Some(parameters) if violations.is_empty() => Ok(Self {
                agent_id: request.agent_id,
                action: request.action,
                parameters,
                parameters_json,
            }),
            _ => Err(violations),
        }
    }

    /// The task this request creates, as its first response shows it.
    pub fn to_queued_task(&self, task_id: Uuid, create_time: DateTime<Utc>) -> Task {
        task(TaskView {
            task_id,
            agent_id: &self.agent_id,
            action: &self.action,
            parameters: &self.parameters,
            status: StoredStatus::Queued.code(),
            create_time,
            result: None,
            attempt: 0,
            update_time: create_time,
            error_message: "",
        })
    }
}

/// Checks an `agent_id`-like field: required, no NUL, at most
/// [`MAX_NAME_BYTES`].
pub(crate) fn check_name(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.is_empty() {
        Err(FieldViolation::new(field, format!("{field} is required")))
    } else if value.contains('\0') {
        Err(FieldViolation::new(field, format!("{field} {NUL}")))
    } else if value.len() > MAX_NAME_BYTES {
        Err(FieldViolation::new(
            field,
            format!(
                "{field} is {} bytes long; at most {MAX_NAME_BYTES} are allowed",
                value.len()
            ),
        ))
    } else {
        Ok(())
    }
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    /// Creation order, used for paging.
    pub seq: i64,
    /// The task's id.
    pub task_id: Uuid,
    /// The owning agent.
    pub agent_id: String,
    /// The action.
    pub action: String,
    /// The parameters.
    pub parameters: Map<String, Value>,
    /// Where the task is in its life: a `TaskStatus` number as stored. It
    /// is passed through as is, so a status written by a newer build still
    /// reads (clients see an enum value they may not know yet).
    pub status: i32,
    /// The result, once something completed the task.
    pub result: Option<Map<String, Value>>,
    /// When the task was created.
    pub create_time: DateTime<Utc>,
    /// How many leases the task has been given.
    pub attempt: i32,
    /// When the task last changed.
    pub update_time: DateTime<Utc>,
    /// Why the last attempt failed; empty if none did.
    pub error_message: String,
    /// The token of the task's latest lease, kept after it ends so a
    /// repeated completion can be recognised.
    pub lease_token: Option<Uuid>,
    /// When the task may next be leased: for a running task, when its lease
    /// runs out.
    pub available_at: DateTime<Utc>,
}

impl TaskRecord {
    /// Whether the task has ended: succeeded, failed or cancelled.
    pub fn is_finished(&self) -> bool {
        StoredStatus::from_code(self.status.into()).is_some_and(StoredStatus::is_finished)
    }

    /// The task as GetTask and ListTasks show it.
    pub fn to_task(&self) -> Task {
        task(TaskView {
            task_id: self.task_id,
            agent_id: &self.agent_id,
            action: &self.action,
            parameters: &self.parameters,
            status: self.status,
            create_time: self.create_time,
            result: self.result.as_ref(),
            attempt: self.attempt,
            update_time: self.update_time,
            error_message: &self.error_message,
        })
    }
}

/// Everything a protobuf `Task` shows, borrowed.
struct TaskView<'a> {
    task_id: Uuid,
    agent_id: &'a str,
    action: &'a str,
    parameters: &'a Map<String, Value>,
    status: i32,
    create_time: DateTime<Utc>,
    result: Option<&'a Map<String, Value>>,
    attempt: i32,
    update_time: DateTime<Utc>,
    error_message: &'a str,
}

/// The one place a protobuf `Task` is built.
fn task(view: TaskView<'_>) -> Task {
    Task {
        task_id: view.task_id.to_string(),
        agent_id: view.agent_id.to_owned(),
        action: view.action.to_owned(),
        parameters: Some(object_to_struct(view.parameters)),
        status: view.status,
        create_time: Some(timestamp(view.create_time)),
        result: view.result.map(object_to_struct),
        attempt: view.attempt,
        update_time: Some(timestamp(view.update_time)),
        error_message: view.error_message.to_owned(),
    }
}

/// A database timestamp as a protobuf `Timestamp`.
pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        // Always below 10^9 for a DateTime, so the cast cannot truncate.
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Struct, Value as ProtoValue, value::Kind};
    use serde_json::json;

    fn request(agent_id: &str, action: &str, parameters: Option<Struct>) -> CreateTaskRequest {
        CreateTaskRequest {
            agent_id: agent_id.into(),
            action: action.into(),
            parameters,
        }
    }

    #[test]
    fn unset_parameters_are_the_empty_object() {
        let task = NewTask::parse(request("a", "b", None), &Limits::default()).unwrap();
        assert!(task.parameters.is_empty());
        assert_eq!(task.parameters_json, "{}");
    }

    #[test]
    fn every_violation_is_reported() {
        let bad = Struct {
            fields: [(
                "n".to_string(),
                ProtoValue {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        let violations =
            NewTask::parse(request("", &"x".repeat(256), Some(bad)), &Limits::default())
                .unwrap_err();
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["agent_id", "action", "parameters.n"]);
    }

    #[test]
    fn oversized_parameters_are_refused() {
        let big = object_to_struct(json!({"s": "x".repeat(100)}).as_object().unwrap());
        let limits = Limits {
            max_parameters_bytes: 50,
        };
        let violations = NewTask::parse(request("a", "b", Some(big)), &limits).unwrap_err();
        assert_eq!(violations[0].field, "parameters");
    }

    #[test]
    fn json_round_trips_through_struct() {
        let value = json!({"a": [1.5, null, true, "s", {"b": {}}], "c": -3});
        let map = value.as_object().unwrap();
        let back = struct_to_json(&object_to_struct(map)).unwrap();
        // Struct numbers are all doubles, so compare the canonical forms.
        assert_eq!(
            canonical_json::object_to_string(&back),
            canonical_json::to_string(&value)
        );
    }

    #[test]
    fn a_new_task_and_its_stored_record_show_the_same_task() {
        let new = NewTask::parse(
            request(
                "a",
                "b",
                object_to_struct(json!({"k": 1}).as_object().unwrap()).into(),
            ),
            &Limits::default(),
        )
        .unwrap();
        let id = Uuid::new_v4();
        let now = Utc::now();
        let record = TaskRecord {
            seq: 1,
            task_id: id,
            agent_id: new.agent_id.clone(),
            action: new.action.clone(),
            parameters: new.parameters.clone(),
            status: StoredStatus::Queued.code(),
            result: None,
            create_time: now,
            attempt: 0,
            update_time: now,
            error_message: String::new(),
            lease_token: None,
            available_at: now,
        };
        assert_eq!(new.to_queued_task(id, now), record.to_task());
    }
}
