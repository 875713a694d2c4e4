//! `parameters` as JSON: a protobuf `Struct` converted to a JSON object,
//! refusing what JSON cannot hold or PostgreSQL cannot store.
//!
//! The field path of a violation (`parameters.items[2]`) is built only for
//! the violation reported, from a chain of borrowed segments, so validating
//! costs the same per member whether the request is valid or not.

use std::fmt::Write;

use prost_types::{Struct, Value as ProtoValue, value::Kind};
use serde_json::{Map, Number, Value};

use super::violation::{FieldViolation, echo, echo_segment};

/// How deeply `parameters` may nest lists and objects.
pub const MAX_PARAMETERS_DEPTH: usize = 32;

/// Why NUL is refused: PostgreSQL text and JSON cannot hold it.
pub(crate) const NUL: &str = "holds a NUL character (U+0000), which cannot be stored; remove it";

/// Request size limits that come from configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The longest canonical JSON form of `parameters`, in bytes.
    pub max_parameters_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_parameters_bytes: 64 * 1024,
        }
    }
}

/// The longest field path reported, in characters.
const MAX_PATH_CHARS: usize = 200;

/// Where a value sits inside `parameters`; rendered only when reported.
#[derive(Clone, Copy)]
enum Path<'a> {
    /// The field itself: `parameters` or `result`.
    Root(&'static str),
    Member(&'a Path<'a>, &'a str),
    Element(&'a Path<'a>, usize),
}

impl Path<'_> {
    fn render(&self) -> String {
        let mut segments = Vec::new();
        let mut at = self;
        let root = loop {
            match at {
                Path::Root(root) => break *root,
                Path::Member(parent, name) => {
                    segments.push(format!(".{}", echo_segment(name)));
                    at = parent;
                }
                Path::Element(parent, index) => {
                    segments.push(format!("[{index}]"));
                    at = parent;
                }
            }
        };
        let mut path = String::from(root);
        for segment in segments.iter().rev() {
            let _ = write!(path, "{segment}");
        }
        // Each segment is short, but 32 levels of them need not be.
        if let Some((cut, _)) = path.char_indices().nth(MAX_PATH_CHARS) {
            path.truncate(cut);
            path.push('…');
        }
        path
    }
}

/// Converts `parameters` to a JSON object, refusing values that have no
/// JSON form (NaN, infinities, a `Value` with no kind), NUL characters, and
/// nesting deeper than [`MAX_PARAMETERS_DEPTH`].
pub fn struct_to_json(value: &Struct) -> Result<Map<String, Value>, FieldViolation> {
    field_to_json("parameters", value)
}

/// Converts the `Struct` field named `field` as [`struct_to_json`] does;
/// violations name paths under `field`.
pub fn field_to_json(
    field: &'static str,
    value: &Struct,
) -> Result<Map<String, Value>, FieldViolation> {
    fields_to_json(value, &Path::Root(field), 1)
}

fn too_deep(path: &Path<'_>) -> FieldViolation {
    FieldViolation::new(
        path.render(),
        format!("the value nests more than {MAX_PARAMETERS_DEPTH} levels deep; flatten it"),
    )
}

fn fields_to_json(
    value: &Struct,
    path: &Path<'_>,
    depth: usize,
) -> Result<Map<String, Value>, FieldViolation> {
    if depth > MAX_PARAMETERS_DEPTH {
        return Err(too_deep(path));
    }
    value
        .fields
        .iter()
        .map(|(name, v)| {
            if name.contains('\0') {
                return Err(FieldViolation::new(
                    path.render(),
                    format!("the member name {} {NUL}", echo(name)),
                ));
            }
            let member = value_to_json(v, &Path::Member(path, name), depth)?;
            Ok((name.clone(), member))
        })
        .collect()
}

fn value_to_json(
    value: &ProtoValue,
    path: &Path<'_>,
    depth: usize,
) -> Result<Value, FieldViolation> {
    Ok(match &value.kind {
        None => {
            return Err(FieldViolation::new(
                path.render(),
                "value has no kind set; use null_value for JSON null",
            ));
        }
        Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) if s.contains('\0') => {
            return Err(FieldViolation::new(
                path.render(),
                format!("the string {NUL}"),
            ));
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        // Canonical JSON (RFC 8785) has no negative zero: -0 is stored as
        // 0, so it is 0 here too, and the first response, its replays and
        // every later read agree to the bit.
        Some(Kind::NumberValue(x)) if *x == 0.0 => Value::Number(Number::from(0)),
        Some(Kind::NumberValue(x)) => Value::Number(Number::from_f64(*x).ok_or_else(|| {
            FieldViolation::new(
                path.render(),
                format!("{x} has no JSON form; send a finite number"),
            )
        })?),
        Some(Kind::StructValue(s)) => Value::Object(fields_to_json(s, path, depth + 1)?),
        Some(Kind::ListValue(list)) => {
            if depth + 1 > MAX_PARAMETERS_DEPTH {
                return Err(too_deep(path));
            }
            Value::Array(
                list.values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| value_to_json(v, &Path::Element(path, i), depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oncely_client::json::object_to_struct;
    use serde_json::json;

    fn number(x: f64) -> ProtoValue {
        ProtoValue {
            kind: Some(Kind::NumberValue(x)),
        }
    }

    #[test]
    fn values_without_kind_and_infinities_are_refused_with_their_path() {
        let nested = Struct {
            fields: [(
                "list".to_string(),
                ProtoValue {
                    kind: Some(Kind::ListValue(prost_types::ListValue {
                        values: vec![number(1.0), ProtoValue { kind: None }],
                    })),
                },
            )]
            .into(),
        };
        assert_eq!(
            struct_to_json(&nested).unwrap_err().field,
            "parameters.list[1]"
        );
        let inf = Struct {
            fields: [("x".to_string(), number(f64::INFINITY))].into(),
        };
        assert_eq!(struct_to_json(&inf).unwrap_err().field, "parameters.x");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut value = Struct::default();
        for _ in 0..MAX_PARAMETERS_DEPTH {
            value = Struct {
                fields: [(
                    "a".to_string(),
                    ProtoValue {
                        kind: Some(Kind::StructValue(value)),
                    },
                )]
                .into(),
            };
        }
        assert!(struct_to_json(&value).is_err());
    }

    #[test]
    fn a_huge_member_name_is_echoed_as_a_short_prefix() {
        let name = format!("{}\0", "n".repeat(1_000_000));
        let bad = object_to_struct(json!({ name: {"inner": f64::MAX} }).as_object().unwrap());
        let violation = struct_to_json(&bad).unwrap_err();
        assert_eq!(violation.field, "parameters");
        assert!(
            violation.description.len() < 300,
            "{}",
            violation.description
        );

        let long = "m".repeat(1_000_000);
        let bad = Struct {
            fields: [(long, number(f64::NAN))].into(),
        };
        let violation = struct_to_json(&bad).unwrap_err();
        assert!(violation.field.len() < 100, "{}", violation.field);
        assert!(violation.field.starts_with("parameters.mmm"));
    }

    #[test]
    fn a_deep_path_of_long_names_is_cut_as_a_whole() {
        let name = "\u{1}".repeat(100);
        let mut value = ProtoValue {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        for _ in 0..MAX_PARAMETERS_DEPTH - 1 {
            value = ProtoValue {
                kind: Some(Kind::StructValue(Struct {
                    fields: [(name.clone(), value)].into(),
                })),
            };
        }
        let Some(Kind::StructValue(deep)) = value.kind else {
            unreachable!()
        };
        let violation = struct_to_json(&deep).unwrap_err();
        assert!(violation.description.contains("no JSON form"));
        assert!(
            violation.field.chars().count() <= MAX_PATH_CHARS + 1,
            "{}",
            violation.field
        );
    }
}
