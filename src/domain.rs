//! Validated requests: a [`NewTask`] can only be built from a request that
//! passed every rule, so the storage layer never sees unvalidated input.

use prost_types::{Struct, Value as ProtoValue, value::Kind};
use serde_json::{Map, Number, Value};

use crate::idempotency::canonical_json;
use crate::proto::tasks_v1::CreateTaskRequest;

/// The longest `agent_id` or `action`, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// How deeply `parameters` may nest lists and objects.
pub const MAX_PARAMETERS_DEPTH: usize = 32;

/// Why NUL is refused: PostgreSQL text and JSON cannot hold it.
const NUL: &str = "holds a NUL character (U+0000), which cannot be stored; remove it";

/// Checks an `agent_id`-like field: required, no NUL, at most
/// [`MAX_NAME_BYTES`]. Used by every RPC that takes one.
pub fn check_agent_id(value: &str) -> Result<(), FieldViolation> {
    let mut violations = Vec::new();
    check_name("agent_id", value, &mut violations);
    violations.pop().map_or(Ok(()), Err)
}

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
    fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

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
        check_name("agent_id", &request.agent_id, &mut violations);
        check_name("action", &request.action, &mut violations);

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
            parameters_json = canonical_json::to_string(&Value::Object(map.clone()));
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
}

fn check_name(field: &str, value: &str, violations: &mut Vec<FieldViolation>) {
    if value.is_empty() {
        violations.push(FieldViolation::new(field, format!("{field} is required")));
    } else if value.contains('\0') {
        violations.push(FieldViolation::new(field, format!("{field} {NUL}")));
    } else if value.len() > MAX_NAME_BYTES {
        violations.push(FieldViolation::new(
            field,
            format!(
                "{field} is {} bytes long; at most {MAX_NAME_BYTES} are allowed",
                value.len()
            ),
        ));
    }
}

/// Converts a protobuf `Struct` to a JSON object, refusing values that have
/// no JSON form (NaN, infinities, a `Value` with no kind) and nesting deeper
/// than [`MAX_PARAMETERS_DEPTH`].
pub fn struct_to_json(value: &Struct) -> Result<Map<String, Value>, FieldViolation> {
    fields_to_json(value, "parameters", 1)
}

fn fields_to_json(
    value: &Struct,
    path: &str,
    depth: usize,
) -> Result<Map<String, Value>, FieldViolation> {
    if depth > MAX_PARAMETERS_DEPTH {
        return Err(FieldViolation::new(
            path,
            format!("parameters nest more than {MAX_PARAMETERS_DEPTH} levels deep"),
        ));
    }
    value
        .fields
        .iter()
        .map(|(name, v)| {
            if name.contains('\0') {
                return Err(FieldViolation::new(
                    path,
                    format!("the member name {name:?} {NUL}"),
                ));
            }
            let member = value_to_json(v, &format!("{path}.{name}"), depth)?;
            Ok((name.clone(), member))
        })
        .collect()
}

fn value_to_json(value: &ProtoValue, path: &str, depth: usize) -> Result<Value, FieldViolation> {
    Ok(match &value.kind {
        None => {
            return Err(FieldViolation::new(
                path,
                "value has no kind set; use null_value for JSON null",
            ));
        }
        Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) if s.contains('\0') => {
            return Err(FieldViolation::new(path, format!("the string {NUL}")));
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(x)) => Value::Number(Number::from_f64(*x).ok_or_else(|| {
            FieldViolation::new(path, format!("{x} has no JSON form; send a finite number"))
        })?),
        Some(Kind::StructValue(s)) => Value::Object(fields_to_json(s, path, depth + 1)?),
        Some(Kind::ListValue(list)) => {
            if depth + 1 > MAX_PARAMETERS_DEPTH {
                return Err(FieldViolation::new(
                    path,
                    format!("parameters nest more than {MAX_PARAMETERS_DEPTH} levels deep"),
                ));
            }
            Value::Array(
                list.values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| value_to_json(v, &format!("{path}[{i}]"), depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

/// Converts a JSON object back to a protobuf `Struct`.
pub fn json_to_struct(map: &Map<String, Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(name, v)| (name.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(value: &Value) -> ProtoValue {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(json_to_struct(map)),
    };
    ProtoValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(agent_id: &str, action: &str, parameters: Option<Struct>) -> CreateTaskRequest {
        CreateTaskRequest {
            agent_id: agent_id.into(),
            action: action.into(),
            parameters,
        }
    }

    fn number(x: f64) -> ProtoValue {
        ProtoValue {
            kind: Some(Kind::NumberValue(x)),
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
            fields: [("n".to_string(), number(f64::NAN))].into(),
        };
        let violations =
            NewTask::parse(request("", &"x".repeat(256), Some(bad)), &Limits::default())
                .unwrap_err();
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["agent_id", "action", "parameters.n"]);
    }

    #[test]
    fn values_without_kind_and_infinities_are_refused() {
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
    fn oversized_parameters_are_refused() {
        let big = json_to_struct(json!({"s": "x".repeat(100)}).as_object().unwrap());
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
        let back = struct_to_json(&json_to_struct(map)).unwrap();
        // Struct numbers are all doubles, so compare the canonical forms.
        assert_eq!(
            canonical_json::to_string(&Value::Object(back)),
            canonical_json::to_string(&value)
        );
    }
}
