//! `serde_json` values to and from `google.protobuf.Struct`, the type of a
//! task's `parameters` and `result`.

use prost_types::{ListValue, Struct, Value as ProtoValue, value::Kind};
use serde_json::{Map, Number, Value};

/// A JSON value that is not an object was given where a `Struct` (a JSON
/// object) is needed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a Struct holds a JSON object, not {0}; wrap the value in an object such as {{\"items\": ...}}"
)]
pub struct NotAnObject(&'static str);

/// A JSON object as a `Struct`, such as a task's `parameters`; any other
/// JSON value is refused, since a `Struct` cannot hold it.
pub fn to_struct(value: Value) -> Result<Struct, NotAnObject> {
    match value {
        Value::Object(map) => Ok(object_to_struct(&map)),
        Value::Null => Err(NotAnObject("null")),
        Value::Bool(_) => Err(NotAnObject("a boolean")),
        Value::Number(_) => Err(NotAnObject("a number")),
        Value::String(_) => Err(NotAnObject("a string")),
        Value::Array(_) => Err(NotAnObject("an array")),
    }
}

/// A JSON object as a `Struct`.
pub fn object_to_struct(map: &Map<String, Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(name, value)| (name.clone(), to_proto_value(value)))
            .collect(),
    }
}

/// A JSON value as a `google.protobuf.Value`. Numbers become doubles, as
/// in every `Struct`.
pub fn to_proto_value(value: &Value) -> ProtoValue {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(to_proto_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(object_to_struct(map)),
    };
    ProtoValue { kind: Some(kind) }
}

/// A `Struct` as a JSON object. Whole numbers that a double holds exactly
/// come back as integers; values JSON cannot hold (NaN, infinities, a
/// value with no kind, which the server never sends) become `null`.
pub fn from_struct(value: &Struct) -> Map<String, Value> {
    value
        .fields
        .iter()
        .map(|(name, v)| (name.clone(), from_proto_value(v)))
        .collect()
}

/// A `google.protobuf.Value` as JSON; see [`from_struct`].
pub fn from_proto_value(value: &ProtoValue) -> Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(x)) => number(*x),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            Value::Array(list.values.iter().map(from_proto_value).collect())
        }
        Some(Kind::StructValue(s)) => Value::Object(from_struct(s)),
    }
}

/// The largest integer below which every whole double is exact: 2^53.
const EXACT_INTEGERS: f64 = 9_007_199_254_740_992.0;

fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < EXACT_INTEGERS {
        // Exact: |x| < 2^53 and whole.
        Value::Number(Number::from(x as i64))
    } else {
        Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_round_trip() {
        let value = json!({"a": [1, 2.5, null, true, "s", {"b": {}}], "c": -3});
        let back = from_struct(&to_struct(value.clone()).unwrap());
        assert_eq!(Value::Object(back), value);
    }

    #[test]
    fn only_objects_become_structs() {
        assert_eq!(to_struct(json!([1, 2])), Err(NotAnObject("an array")));
        assert!(to_struct(json!("text")).is_err());
        assert_eq!(to_struct(json!({})), Ok(Struct::default()));
    }

    #[test]
    fn values_json_cannot_hold_become_null() {
        let value = Struct {
            fields: [
                (
                    "nan".to_owned(),
                    ProtoValue {
                        kind: Some(Kind::NumberValue(f64::NAN)),
                    },
                ),
                ("none".to_owned(), ProtoValue { kind: None }),
                (
                    "big".to_owned(),
                    ProtoValue {
                        kind: Some(Kind::NumberValue(1e300)),
                    },
                ),
            ]
            .into(),
        };
        let map = from_struct(&value);
        assert_eq!(map["nan"], Value::Null);
        assert_eq!(map["none"], Value::Null);
        assert_eq!(map["big"], json!(1e300));
    }
}
