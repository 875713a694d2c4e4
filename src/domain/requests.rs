//! The arguments of GetTask, ListTasks and Cleanup, each parsed into a type
//! the way CreateTask's are into a [`NewTask`](super::NewTask).

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use uuid::Uuid;

use super::{
    task::check_name,
    violation::{FieldViolation, echo},
};
use crate::proto::tasks_v1::{
    CancelTaskRequest, CleanupRequest, GetTaskRequest, ListTasksRequest, WaitTaskRequest,
};

/// A task's id, parsed from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskId(pub Uuid);

impl TaskId {
    /// Parses the `task_id` of a GetTask request.
    pub fn parse(request: &GetTaskRequest) -> Result<Self, Vec<FieldViolation>> {
        Self::parse_field("task_id", &request.task_id).map_err(|v| vec![v])
    }

    /// Parses the `task_id` of a CancelTask request.
    pub fn parse_cancel(request: &CancelTaskRequest) -> Result<Self, Vec<FieldViolation>> {
        Self::parse_field("task_id", &request.task_id).map_err(|v| vec![v])
    }

    /// Parses a task id sent in `field`.
    pub fn parse_field(field: &str, text: &str) -> Result<Self, FieldViolation> {
        Uuid::parse_str(text).map(Self).map_err(|_| {
            FieldViolation::new(
                field,
                format!(
                    "{field} {} is not a UUID; send the task_id that CreateTask returned",
                    echo(text)
                ),
            )
        })
    }
}

/// How long WaitTask waits when the request does not say.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest WaitTask (and LeaseTasks) wait.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A WaitTask request, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitQuery {
    /// The task to wait for.
    pub task_id: TaskId,
    /// How long to wait at most (before the call's own deadline).
    pub timeout: Duration,
}

impl WaitQuery {
    /// Validates a request, reporting every violation at once.
    pub fn parse(request: &WaitTaskRequest) -> Result<Self, Vec<FieldViolation>> {
        let task_id = TaskId::parse_field("task_id", &request.task_id);
        let timeout = match request.timeout {
            None => Ok(DEFAULT_WAIT_TIMEOUT),
            Some(d) => bounded_duration("timeout", d, Duration::ZERO, MAX_WAIT),
        };
        match (task_id, timeout) {
            (Ok(task_id), Ok(timeout)) => Ok(Self { task_id, timeout }),
            (task_id, timeout) => Err(task_id.err().into_iter().chain(timeout.err()).collect()),
        }
    }
}

/// A protobuf `Duration` in `field`, between `min` and `max` inclusive.
pub(crate) fn bounded_duration(
    field: &str,
    d: prost_types::Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, FieldViolation> {
    let shown = |d: Duration| humantime::format_duration(d).to_string();
    let value = non_negative_duration(field, d)?;
    if value < min || value > max {
        return Err(FieldViolation::new(
            field,
            format!(
                "{field} is {}; send a duration from {} to {}",
                shown(value),
                shown(min),
                shown(max)
            ),
        ));
    }
    Ok(value)
}

/// A protobuf `Duration` that must not be negative, in whole microseconds
/// (the database's resolution).
fn non_negative_duration(
    field: &str,
    d: prost_types::Duration,
) -> Result<Duration, FieldViolation> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(FieldViolation::new(
            field,
            format!(
                "{field} is negative ({}s {}ns); send a positive duration",
                d.seconds, d.nanos
            ),
        ));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(FieldViolation::new(
            field,
            format!(
                "{field} has {} nanos; at most 999999999 are allowed",
                d.nanos
            ),
        ));
    }
    Ok(Duration::new(
        d.seconds as u64,
        (d.nanos as u32 / 1000) * 1000,
    ))
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The page size used when a request asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest page; larger requests are clamped to it.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Where a page of tasks ends early: once it holds this many bytes of
/// parameters and results (the page may pass it by its last task). Well
/// under the 4 MiB that gRPC clients accept by default.
pub const MAX_PAGE_BYTES: i64 = 2 * 1024 * 1024;

/// A ListTasks request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Whose tasks.
    pub agent_id: String,
    /// How many tasks a page holds, 1 to [`MAX_PAGE_SIZE`].
    pub page_size: usize,
    /// Where the page starts.
    pub after: PageToken,
}

impl ListQuery {
    /// Validates a request, reporting every violation at once.
    pub fn parse(request: ListTasksRequest) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        violations.extend(check_name("agent_id", &request.agent_id).err());
        let page_size = match usize::try_from(request.page_size) {
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) => n.min(MAX_PAGE_SIZE),
            Err(_) => {
                violations.push(FieldViolation::new(
                    "page_size",
                    format!(
                        "page_size is {}; send 0 for the default or a positive number",
                        request.page_size
                    ),
                ));
                0
            }
        };
        let after = PageToken::decode(&request.page_token);
        if after.is_none() {
            violations.push(FieldViolation::new(
                "page_token",
                "page_token is not one this service issued; send the next_page_token of the previous page, or nothing",
            ));
        }
        match after {
            Some(after) if violations.is_empty() => Ok(Self {
                agent_id: request.agent_id,
                page_size,
                after,
            }),
            _ => Err(violations),
        }
    }
}

/// Where a page of tasks starts: after the task with this creation number
/// (0 for the first page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken(pub i64);

impl PageToken {
    const PREFIX: &str = "v1:";

    /// The opaque form sent to clients.
    pub fn encode(self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}{}", Self::PREFIX, self.0))
    }

    /// The start of the first page for an empty token, `None` for a token
    /// this service did not issue.
    pub fn decode(token: &str) -> Option<Self> {
        if token.is_empty() {
            return Some(Self(0));
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        text.strip_prefix(Self::PREFIX)?
            .parse()
            .ok()
            .filter(|seq| *seq > 0)
            .map(Self)
    }
}

/// The longest `older_than` accepted: 100 years.
const MAX_OLDER_THAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A Cleanup request, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupQuery {
    /// Delete keyed records older than this; never shorter than the
    /// retention.
    pub older_than: Duration,
}

impl CleanupQuery {
    /// Validates a request against the server's `retention`; an unset
    /// `older_than` means the retention.
    pub fn parse(
        request: &CleanupRequest,
        retention: Duration,
    ) -> Result<Self, Vec<FieldViolation>> {
        let older_than = match request.older_than {
            None => retention,
            Some(d) => duration(d).map_err(|v| vec![v])?,
        };
        if older_than < retention {
            // A live record is what makes a retry safe; deleting one would let
            // the next retry with its key run the side effect again.
            return Err(vec![FieldViolation::new(
                "older_than",
                format!(
                    "older_than is {}, shorter than the retention of {}: records younger than the retention still protect retries; send at least the retention or leave older_than unset",
                    humantime::format_duration(older_than),
                    humantime::format_duration(retention)
                ),
            )]);
        }
        Ok(Self { older_than })
    }
}

fn duration(d: prost_types::Duration) -> Result<Duration, FieldViolation> {
    let value = non_negative_duration("older_than", d)?;
    if value > MAX_OLDER_THAN {
        return Err(FieldViolation::new(
            "older_than",
            "older_than is longer than 100 years",
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_foreign_tokens_are_refused() {
        assert_eq!(PageToken::decode(""), Some(PageToken(0)));
        assert_eq!(
            PageToken::decode(&PageToken(42).encode()),
            Some(PageToken(42))
        );
        assert_eq!(PageToken::decode("42"), None);
        assert_eq!(PageToken::decode(&URL_SAFE_NO_PAD.encode("v1:-3")), None);
    }

    #[test]
    fn a_list_request_is_parsed_with_defaults_and_limits() {
        let query = ListQuery::parse(ListTasksRequest {
            agent_id: "a".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .unwrap();
        assert_eq!(
            (query.page_size, query.after),
            (DEFAULT_PAGE_SIZE, PageToken(0))
        );
        let big = ListQuery::parse(ListTasksRequest {
            agent_id: "a".into(),
            page_size: 5000,
            page_token: String::new(),
        })
        .unwrap();
        assert_eq!(big.page_size, MAX_PAGE_SIZE);
        let bad = ListQuery::parse(ListTasksRequest {
            agent_id: String::new(),
            page_size: -1,
            page_token: "nope".into(),
        })
        .unwrap_err();
        let fields: Vec<_> = bad.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["agent_id", "page_size", "page_token"]);
    }

    #[test]
    fn a_task_id_that_is_not_a_uuid_is_echoed_as_a_short_prefix() {
        let request = GetTaskRequest {
            task_id: "\u{1}".repeat(1_000_000),
        };
        let violations = TaskId::parse(&request).unwrap_err();
        assert_eq!(violations[0].field, "task_id");
        assert!(violations[0].description.len() < 500);
    }

    #[test]
    fn cleanup_never_goes_below_the_retention() {
        let hour = Duration::from_secs(3600);
        let unset = CleanupRequest { older_than: None };
        assert_eq!(CleanupQuery::parse(&unset, hour).unwrap().older_than, hour);
        let short = CleanupRequest {
            older_than: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        };
        assert!(CleanupQuery::parse(&short, hour).is_err());
        let nanos = CleanupRequest {
            older_than: Some(prost_types::Duration {
                seconds: 7200,
                nanos: 1_500,
            }),
        };
        assert_eq!(
            CleanupQuery::parse(&nanos, hour).unwrap().older_than,
            Duration::new(7200, 1_000)
        );
    }
}
