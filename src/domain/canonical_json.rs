//! The canonical JSON form used for fingerprints, after RFC 8785 (JCS):
//! object members sorted by their names' UTF-16 code units, no whitespace,
//! strings escaped as `JSON.stringify` does, and numbers in ECMAScript's
//! shortest round-trip form (`1`, `4.5`, `1e+21`, `1e-7`).

use serde_json::{Map, Value};

/// Writes `value` in canonical form.
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

/// Writes a JSON object in canonical form.
pub fn object_to_string(members: &Map<String, Value>) -> String {
    let mut out = String::new();
    write_object(&mut out, members);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => match n.as_f64() {
            Some(x) => write_number(out, x),
            // serde_json numbers always have an f64 view; keep the text if not.
            None => out.push_str(&n.to_string()),
        },
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(members) => write_object(out, members),
    }
}

fn write_object(out: &mut String, members: &Map<String, Value>) {
    let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
    sorted.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
    out.push('{');
    for (i, (name, member)) in sorted.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, name);
        out.push(':');
        write_value(out, member);
    }
    out.push('}');
}

/// serde_json escapes exactly as JCS asks: `"`, `\` and control characters
/// (`\b \t \n \f \r`, the rest as lowercase `\u00xx`); everything else is
/// written as UTF-8.
fn write_string(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serialising a &str cannot fail; fall back to the debug form anyway.
        Err(_) => out.push_str(&format!("{s:?}")),
    }
}

/// ECMAScript's Number::toString for finite numbers (ECMA-262 7.1.12.1).
fn write_number(out: &mut String, x: f64) {
    if x == 0.0 {
        // Also -0.
        out.push('0');
        return;
    }
    // Rust's `{:e}` prints the shortest digits that round-trip: "d.ddde[-]n".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let k = digits.len() as i32;
    // x = 0.d1d2..dk * 10^n
    let n = exponent + 1;
    if x < 0.0 {
        out.push('-');
    }
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        let (int, frac) = digits.split_at(n as usize);
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        out.push('e');
        out.push(if n > 0 { '+' } else { '-' });
        out.push_str(&(n - 1).abs().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn number(x: f64) -> String {
        let mut s = String::new();
        write_number(&mut s, x);
        s
    }

    #[test]
    fn numbers_follow_ecmascript() {
        // RFC 8785 appendix B and section 3.2.2.3.
        let cases = [
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (-1.0, "-1"),
            (4.5, "4.5"),
            (0.002, "0.002"),
            (1e30, "1e+30"),
            (1e-27, "1e-27"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (1e-7, "1e-7"),
            (0.000001, "0.000001"),
            (123456789012345680000.0, "123456789012345680000"),
            (333333333.3333333, "333333333.3333333"),
            (9007199254740992.0, "9007199254740992"),
            (5e-324, "5e-324"),
            (-1.7976931348623157e308, "-1.7976931348623157e+308"),
            (295147905179352830000.0, "295147905179352830000"),
            (1.5e300, "1.5e+300"),
        ];
        for (x, want) in cases {
            assert_eq!(number(x), want, "formatting {x:e}");
        }
    }

    #[test]
    fn objects_are_sorted_and_compact() {
        let value = json!({"b": [1, 2.5, "x"], "a": {"d": null, "c": true}, "": false});
        assert_eq!(
            to_string(&value),
            r#"{"":false,"a":{"c":true,"d":null},"b":[1,2.5,"x"]}"#
        );
    }

    #[test]
    fn names_sort_by_utf16_code_units() {
        // U+1F600 is D83D DE00 in UTF-16, which sorts before U+FFFD; UTF-8
        // byte order would put it after.
        let value = json!({"\u{fffd}": 1, "\u{1f600}": 2});
        assert_eq!(to_string(&value), "{\"\u{1f600}\":2,\"\u{fffd}\":1}");
    }

    #[test]
    fn strings_escape_like_json_stringify() {
        let value = json!("q\"b\\n\n\u{1}\u{7f}é");
        assert_eq!(to_string(&value), "\"q\\\"b\\\\n\\n\\u0001\u{7f}é\"");
    }
}
