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

/// Caller input in double quotes, cut to its first [`ECHO_CHARS`]
/// characters with its full size noted when longer, and with control
/// characters, `"` and `\` escaped (`\n`, `\u{1}`): safe to put in an error
/// message or a log line.
pub fn echo(text: &str) -> String {
    let mut out = String::from("\"");
    let cut = push_prefix(&mut out, text, |c| c.is_control() || c == '"' || c == '\\');
    out.push('"');
    if cut {
        let _ = write!(out, "… ({} bytes)", text.len());
    }
    out
}

/// A segment of a field path (a member name): cut like [`echo`], with only
/// control characters escaped, so ordinary names read as sent.
pub fn echo_segment(text: &str) -> String {
    let mut out = String::new();
    if push_prefix(&mut out, text, char::is_control) {
        out.push('…');
    }
    out
}

/// Appends the first [`ECHO_CHARS`] characters of `text`, escaping those
/// `escape` picks; returns whether any characters were left out.
fn push_prefix(out: &mut String, text: &str, escape: impl Fn(char) -> bool) -> bool {
    let mut chars = text.chars();
    for c in chars.by_ref().take(ECHO_CHARS) {
        if escape(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    chars.next().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_echoed_whole_and_escaped() {
        assert_eq!(echo("abc"), "\"abc\"");
        assert_eq!(echo("a\u{1}\n\"'é"), "\"a\\u{1}\\n\\\"'é\"");
        assert_eq!(echo_segment("it's é"), "it's é");
        assert_eq!(echo_segment("a\nb"), "a\\nb");
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
