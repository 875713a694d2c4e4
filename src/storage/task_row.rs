//! A task's row as both stores keep it: its columns (`task_columns!`) and
//! its status, one small integer per [`StoredStatus`] (the domain's type,
//! the same number the protobuf enum gives it), which the `status!` macro
//! spells for SQL text; a unit test holds the two to each other.
//!
//! The SQL gets the numbers as literals (`status!(running)` expands to
//! `"2"` inside `concat!`), not as bound parameters: the partial indexes
//! (`tasks_leasable ... WHERE status IN (1, 2)`, `tasks_failed ... WHERE
//! status = 4`) are only used when the planner can see that a statement's
//! predicate implies theirs, which a parameter hides in a generic plan; and
//! each statement stays one `&'static str`, prepared once per connection.

#[cfg(doc)]
use crate::domain::StoredStatus;

/// The SQL literal of a stored status, of the leasable ones (`leasable`, as
/// the `tasks_leasable` index's predicate spells it), or of those a task
/// may still leave (`unfinished`: what can be cancelled), for
/// use inside `concat!`. A unit test holds each literal to
/// [`StoredStatus::code`].
macro_rules! status {
    (queued) => {
        "1"
    };
    (running) => {
        "2"
    };
    (succeeded) => {
        "3"
    };
    (failed) => {
        "4"
    };
    (cancelled) => {
        "5"
    };
    (leasable) => {
        "(1, 2)"
    };
    (unfinished) => {
        "(1, 2)"
    };
}

/// The columns of a task row, in the order both stores' `task_record`
/// (the row decoders in `postgres/queries` and `sqlite/queries`) read
/// them: one list for the two dialects.
macro_rules! task_columns {
    () => {
        "seq, task_id, agent_id, action, parameters, status, result, create_time, \
         attempt, update_time, error_message, lease_token, available_at"
    };
}

#[cfg(test)]
mod tests {
    use crate::domain::StoredStatus;

    #[test]
    fn sql_literals_are_the_codes() {
        let literal = |text: &str| text.parse::<i32>().ok();
        assert_eq!(literal(status!(queued)), Some(StoredStatus::Queued.code()));
        assert_eq!(
            literal(status!(running)),
            Some(StoredStatus::Running.code())
        );
        assert_eq!(
            literal(status!(succeeded)),
            Some(StoredStatus::Succeeded.code())
        );
        assert_eq!(literal(status!(failed)), Some(StoredStatus::Failed.code()));
        assert_eq!(
            literal(status!(cancelled)),
            Some(StoredStatus::Cancelled.code())
        );
        let unfinished: Vec<String> = StoredStatus::ALL
            .into_iter()
            .filter(|s| !s.is_finished())
            .map(|s| s.code().to_string())
            .collect();
        assert_eq!(status!(unfinished), format!("({})", unfinished.join(", ")));
        assert_eq!(
            status!(leasable),
            format!(
                "({}, {})",
                StoredStatus::Queued.code(),
                StoredStatus::Running.code()
            )
        );
    }
}
