//! What a refusal says about one field, and how much of the caller's input
//! it may repeat: error messages and logs echo at most a short prefix of
//! anything the caller sent, whatever its size.

use std::fmt::Write;

/// The most characters of caller input an error message repeats.
pub const ECHO_CHARS: usize = 40;

/// One problem with one field of a request, reported as a `BadRequest`
/// field violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field's path, such as `agent_id` or `parameters.items[2]`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Caller input, quoted and escaped as Rust's `{:?}` does, cut to its first
/// [`ECHO_CHARS`] characters with its full size noted when longer: safe to
/// put in an error message or a log line.
pub fn echo(text: &str) -> String {
    let mut out = String::from("\"");
    let cut = push_escaped_prefix(&mut out, text);
    out.push('"');
    if cut {
        let _ = write!(out, "… ({} bytes)", text.len());
    }
    out
}

/// Like [`echo`] without quotes, for a segment of a field path.
pub fn echo_segment(text: &str) -> String {
    let mut out = String::new();
    if push_escaped_prefix(&mut out, text) {
        out.push('…');
    }
    out
}

/// Appends the escaped first [`ECHO_CHARS`] characters of `text`; returns
/// whether any were left out.
fn push_escaped_prefix(out: &mut String, text: &str) -> bool {
    let mut chars = text.chars();
    for c in chars.by_ref().take(ECHO_CHARS) {
        out.extend(c.escape_debug());
    }
    chars.next().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_echoed_whole_and_escaped() {
        assert_eq!(echo("abc"), "\"abc\"");
        assert_eq!(echo("a\u{1}\n\""), "\"a\\u{1}\\n\\\"\"");
        assert_eq!(echo_segment("to"), "to");
    }

    #[test]
    fn long_input_is_cut_to_a_prefix_with_its_size() {
        let long = "x".repeat(3_000_000);
        let echoed = echo(&long);
        assert_eq!(
            echoed,
            format!("\"{}\"… (3000000 bytes)", "x".repeat(ECHO_CHARS))
        );
        assert_eq!(echo_segment(&long), format!("{}…", "x".repeat(ECHO_CHARS)));
        // Escapes multiply a character at most tenfold.
        assert!(echo(&"\u{1}".repeat(10_000)).len() < 16 * ECHO_CHARS);
    }
}
