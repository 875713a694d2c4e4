//! What a handler returns when its attempt failed.

use std::{fmt, time::Duration};

/// A failed attempt, as a handler reports it: the message kept on the task,
/// whether another attempt could help, and how soon to make it.
///
/// Any `std::error::Error` converts into a retryable `TaskError` with the
/// error's message and its causes, so `?` works in a handler; a failure is
/// retryable unless you say otherwise, as in Sidekiq or Oban:
///
/// ```
/// use std::time::Duration;
/// use oncely_client::TaskError;
///
/// fn parse(to: &str) -> Result<(), TaskError> {
///     if !to.contains('@') {
///         // Retrying cannot fix the address: end the task FAILED now.
///         return Err(TaskError::permanent(format!("not an address: {to:?}")));
///     }
///     Ok(())
/// }
///
/// let throttled = TaskError::retryable("rate limited").retry_after(Duration::from_secs(30));
/// assert_eq!(throttled.retry_delay(), Some(Duration::from_secs(30)));
/// assert!(parse("nobody").unwrap_err().is_permanent());
/// ```
///
/// `TaskError` does not implement `std::error::Error` itself (that would
/// conflict with the conversion from every error), like `anyhow::Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    message: String,
    permanent: bool,
    retry_after: Option<Duration>,
}

impl TaskError {
    /// A failure another attempt may not have: the task goes back to the
    /// queue after the server's backoff, unless this was its last allowed
    /// attempt.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            retry_after: None,
        }
    }

    /// A failure no retry can help: the task ends FAILED with `message`.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
            retry_after: None,
        }
    }

    /// Asks for the next attempt no sooner than `delay` from now, instead
    /// of the server's backoff (say, what a rate limit's `Retry-After`
    /// said). Ignored on a permanent failure.
    #[must_use]
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The message kept on the task (the server cuts it at 8 KiB).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the task ends FAILED now.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The delay set with [`retry_after`](Self::retry_after); `None` means
    /// the server's backoff. Always `None` on a permanent failure.
    pub fn retry_delay(&self) -> Option<Duration> {
        if self.permanent {
            None
        } else {
            self.retry_after
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.permanent {
            "permanent"
        } else {
            "retryable"
        };
        write!(f, "{kind} failure: {}", self.message)
    }
}

impl<E: std::error::Error> From<E> for TaskError {
    /// A retryable failure whose message is the error and its causes,
    /// joined with `": "`.
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::retryable(message)
    }
}

/// The failure reported for a handler that panicked: retryable, since a
/// panic is a bug or a surprise rather than a verdict on the task.
pub(crate) fn from_panic(payload: &(dyn std::any::Any + Send)) -> TaskError {
    let what = if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.as_str()
    } else {
        "a panic without a message"
    };
    TaskError::retryable(format!("the handler panicked: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_say_what_the_server_is_told() {
        let error = TaskError::retryable("smtp down");
        assert_eq!(
            (error.message(), error.is_permanent(), error.retry_delay()),
            ("smtp down", false, None)
        );
        let error = TaskError::permanent("no such mailbox");
        assert!(error.is_permanent());
        assert_eq!(error.to_string(), "permanent failure: no such mailbox");
        let error = TaskError::retryable("throttled").retry_after(Duration::from_secs(3));
        assert_eq!(error.retry_delay(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_permanent_failure_has_no_retry_delay() {
        let error = TaskError::permanent("bad input").retry_after(Duration::from_secs(3));
        assert_eq!(error.retry_delay(), None);
    }

    #[test]
    fn errors_convert_to_retryable_failures_with_their_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("sending failed")]
        struct Outer(#[source] std::io::Error);
        let error: TaskError = Outer(std::io::Error::other("connection reset")).into();
        assert!(!error.is_permanent());
        assert_eq!(error.message(), "sending failed: connection reset");
    }

    #[test]
    fn question_mark_works_in_a_handler() {
        fn handler() -> Result<i64, TaskError> {
            Ok("12x".parse::<i64>()?)
        }
        assert!(handler().unwrap_err().message().contains("invalid digit"));
    }

    #[test]
    fn panics_become_retryable_failures_with_their_message() {
        let literal: Box<dyn std::any::Any + Send> = Box::new("boom");
        let formatted: Box<dyn std::any::Any + Send> = Box::new(format!("bad {}", 7));
        let other: Box<dyn std::any::Any + Send> = Box::new(7_u8);
        assert_eq!(
            from_panic(literal.as_ref()).message(),
            "the handler panicked: boom"
        );
        assert_eq!(
            from_panic(formatted.as_ref()).message(),
            "the handler panicked: bad 7"
        );
        assert!(!from_panic(other.as_ref()).is_permanent());
    }
}
