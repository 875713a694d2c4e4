//! A task's status as stored: one small integer per status, the number
//! the protobuf enum gives it, its name for metrics and the status page,
//! and which statuses a task never leaves. The stores spell the same
//! numbers in SQL with `storage`'s `status!` macro, held to these by a test.

use std::fmt;

use crate::proto::tasks_v1::TaskStatus;

/// A task's status as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredStatus {
    /// Waiting for a worker (or for its backoff to end).
    Queued,
    /// Leased to a worker.
    Running,
    /// Completed with a result.
    Succeeded,
    /// Ended by a permanent failure or its last attempt.
    Failed,
    /// Cancelled before it ended.
    Cancelled,
}

impl StoredStatus {
    /// Every status, in the order of their numbers.
    pub const ALL: [Self; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// Every status's name, in the order of [`Self::ALL`] (metric labels,
    /// the status page).
    pub const NAMES: [&'static str; 5] = [
        Self::Queued.name(),
        Self::Running.name(),
        Self::Succeeded.name(),
        Self::Failed.name(),
        Self::Cancelled.name(),
    ];

    /// The number stored in the `status` column.
    pub const fn code(self) -> i32 {
        match self {
            Self::Queued => 1,
            Self::Running => 2,
            Self::Succeeded => 3,
            Self::Failed => 4,
            Self::Cancelled => 5,
        }
    }

    /// The status a stored number stands for; `None` for a number this
    /// build does not know (a newer build's).
    pub fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|s| i64::from(s.code()) == code)
    }

    /// The status's lower-case name, as metrics and the status page show it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether a task never leaves this status.
    pub const fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The protobuf status shown for it.
    pub const fn to_proto(self) -> TaskStatus {
        match self {
            Self::Queued => TaskStatus::Queued,
            Self::Running => TaskStatus::Running,
            Self::Succeeded => TaskStatus::Succeeded,
            Self::Failed => TaskStatus::Failed,
            Self::Cancelled => TaskStatus::Cancelled,
        }
    }
}

impl fmt::Display for StoredStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_map_both_ways() {
        for (place, status) in StoredStatus::ALL.into_iter().enumerate() {
            assert_eq!(
                StoredStatus::from_code(i64::from(status.code())),
                Some(status)
            );
            assert_eq!(StoredStatus::NAMES[place], status.name());
            assert_eq!(status.to_string(), status.name());
        }
        assert_eq!(StoredStatus::from_code(0), None);
        assert_eq!(StoredStatus::from_code(6), None);
    }

    #[test]
    fn stored_codes_are_the_protobuf_numbers() {
        for status in StoredStatus::ALL {
            assert_eq!(status.code(), status.to_proto() as i32, "{status}");
            assert_eq!(
                status.to_proto().as_str_name().to_ascii_lowercase(),
                format!("task_status_{}", status.name()),
            );
        }
    }
}
