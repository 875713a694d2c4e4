//! Properties of the request path that no list of examples pins down: the
//! canonical JSON form and the fingerprint, over generated documents and
//! requests, and a bounded fuzz loop from raw bytes to the fingerprint.
//!
//! `cargo test --test properties` runs each property over proptest's default
//! 256 cases (the fuzz loop over 20,000 inputs). The long run is by hand:
//!
//! ```sh
//! PROPTEST_CASES=20000 FUZZ_INPUTS=1000000 cargo test --release --test properties
//! ```
//!
//! (its figures are in RELIABILITY.md).

use oncely::{
    domain::{Limits, NewTask, canonical_json},
    idempotency::Fingerprint,
    proto::tasks_v1::CreateTaskRequest,
};
use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};
use prost::Message;
use prost_types::Struct;
use serde_json::{Map, Value};

const METHOD: &str = "tasks.v1.TaskService/CreateTask";

/// Finite numbers, including the awkward ones: integers past 2^53, tiny and
/// huge magnitudes, negative zero.
fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |x| x.is_finite()),
        any::<i64>().prop_map(|n| n as f64),
        (-1000i32..1000).prop_map(f64::from),
        Just(-0.0),
        Just(5e-324),
        Just(f64::MAX),
    ]
}

/// Strings without NUL (which the server refuses), from all of Unicode.
fn text() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

/// JSON documents as the server takes them.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number().prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(text(), json(), 0..8).prop_map(|m| m.into_iter().collect())
}

fn to_struct(members: &Map<String, Value>) -> Struct {
    oncely_client::json::to_struct(Value::Object(members.clone())).expect("an object")
}

fn request(agent_id: &str, action: &str, parameters: &Map<String, Value>) -> CreateTaskRequest {
    CreateTaskRequest {
        agent_id: agent_id.into(),
        action: action.into(),
        parameters: Some(to_struct(parameters)),
    }
}

/// The fingerprint the server computes for these bytes, or why it refuses
/// them.
fn fingerprint_of_bytes(bytes: &[u8]) -> Result<Fingerprint, String> {
    let request = CreateTaskRequest::decode(bytes).map_err(|e| e.to_string())?;
    let task = NewTask::parse(request, &Limits::default()).map_err(|v| format!("{v:?}"))?;
    Ok(Fingerprint::of_new_task(METHOD, &task))
}

fn fingerprint(request: &CreateTaskRequest) -> Fingerprint {
    fingerprint_of_bytes(&request.encode_to_vec()).expect("a valid request")
}

// ---- protobuf wire rewriting ----------------------------------------------

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// `n` in one byte more than it needs: valid protobuf, not canonical.
fn long_varint(n: u64, out: &mut Vec<u8>) {
    let start = out.len();
    varint(n, out);
    let last = out.len() - 1;
    out[last] |= 0x80;
    out.push(0);
    debug_assert!(out.len() > start);
}

fn read_varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = bytes[*at];
        *at += 1;
        n |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            break;
        }
    }
    n
}

/// The top-level fields of a message: (field number, wire type, payload).
/// Only wire types 0 (varint) and 2 (length-delimited) occur here.
fn fields(bytes: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        let key = read_varint(bytes, &mut at);
        let (number, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => {
                let from = at;
                read_varint(bytes, &mut at);
                bytes[from..at].to_vec()
            }
            1 => {
                at += 8;
                bytes[at - 8..at].to_vec()
            }
            2 => {
                let len = read_varint(bytes, &mut at) as usize;
                at += len;
                bytes[at - len..at].to_vec()
            }
            other => panic!("wire type {other} does not occur"),
        };
        out.push((number, wire, payload));
    }
    out
}

fn write_field(number: u64, wire: u64, payload: &[u8], long: bool, out: &mut Vec<u8>) {
    let put = |n, out: &mut Vec<u8>| {
        if long {
            long_varint(n, out)
        } else {
            varint(n, out)
        }
    };
    put((number << 3) | wire, out);
    if wire == 2 {
        put(payload.len() as u64, out);
    }
    out.extend_from_slice(payload);
}

/// The same request on the wire in another form: its fields in reverse
/// order, the map entries of its parameters in reverse order, every tag and
/// length of those in a non-minimal varint, and a decoy agent_id and action
/// sent first (a later occurrence of a field replaces an earlier one).
fn rewritten(request: &CreateTaskRequest) -> Vec<u8> {
    let mut out = Vec::new();
    write_field(1, 2, b"decoy-agent", true, &mut out);
    write_field(2, 2, b"decoy-action", true, &mut out);
    for (number, wire, payload) in fields(&request.encode_to_vec()).into_iter().rev() {
        let payload = if number == 3 {
            let mut entries = Vec::new();
            for (n, w, entry) in fields(&payload).into_iter().rev() {
                write_field(n, w, &entry, true, &mut entries);
            }
            entries
        } else {
            payload
        };
        write_field(number, wire, &payload, true, &mut out);
    }
    out
}

proptest! {
    #[test]
    fn the_canonical_form_is_a_fixed_point(value in json()) {
        let canonical = canonical_json::to_string(&value);
        let reparsed: Value = serde_json::from_str(&canonical).expect("canonical JSON parses");
        prop_assert_eq!(canonical_json::to_string(&reparsed), canonical);
    }

    #[test]
    fn numbers_are_the_shortest_digits_that_round_trip(x in number()) {
        let written = canonical_json::to_string(&Value::from(x));
        let back: f64 = written.parse().expect("a JSON number");
        // RFC 8785 has no negative zero.
        let x = if x == 0.0 { 0.0 } else { x };
        prop_assert_eq!(back.to_bits(), x.to_bits(), "{} read back as {}", written, back);
        // The digits are Rust's shortest round-trip digits; only the layout
        // (where the point goes, when an exponent is used) is ECMAScript's.
        let digits = |s: &str| {
            let mantissa = s.split(['e', 'E']).next().unwrap_or_default();
            let all: String = mantissa.chars().filter(char::is_ascii_digit).collect();
            all.trim_start_matches('0').trim_end_matches('0').to_owned()
        };
        prop_assert_eq!(digits(&written), digits(&format!("{x:e}")));
    }

    #[test]
    fn the_same_request_in_any_wire_form_has_one_fingerprint(
        agent in "[a-z][a-z0-9-]{0,15}",
        action in "[a-z][a-z_]{0,15}",
        parameters in object(),
    ) {
        let request = request(&agent, &action, &parameters);
        let other_form = rewritten(&request);
        prop_assert_ne!(&other_form, &request.encode_to_vec());
        prop_assert_eq!(
            fingerprint_of_bytes(&other_form).expect("the rewritten form is valid"),
            fingerprint(&request)
        );
    }

    #[test]
    fn permuting_members_keeps_the_fingerprint(members in object()) {
        let reversed: Map<String, Value> = members
            .iter()
            .rev()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        prop_assert_eq!(
            fingerprint(&request("agent-1", "act", &members)),
            fingerprint(&request("agent-1", "act", &reversed))
        );
    }

    #[test]
    fn any_change_to_a_value_changes_the_fingerprint(
        members in object(),
        name in text(),
        before in json(),
        after in json(),
    ) {
        prop_assume!(canonical_json::to_string(&before) != canonical_json::to_string(&after));
        let with = |value: &Value| {
            let mut changed = members.clone();
            changed.insert(name.clone(), value.clone());
            fingerprint(&request("agent-1", "act", &changed))
        };
        prop_assert_ne!(with(&before), with(&after));
    }

    #[test]
    fn any_change_to_the_agent_or_action_changes_the_fingerprint(
        parameters in object(),
        a in "[a-z]{1,8}",
        b in "[a-z]{1,8}",
    ) {
        prop_assume!(a != b);
        prop_assert_ne!(
            fingerprint(&request(&a, "act", &parameters)),
            fingerprint(&request(&b, "act", &parameters))
        );
        prop_assert_ne!(
            fingerprint(&request("agent", &a, &parameters)),
            fingerprint(&request("agent", &b, &parameters))
        );
    }
}

/// Raw bytes through the whole request path: decode, validate, canonical
/// JSON, fingerprint. Half the inputs are valid requests with bytes flipped,
/// cut or inserted, half are random bytes. None may panic; each is either
/// fingerprinted or refused (a decode error or field violations: what the
/// server answers INVALID_ARGUMENT).
#[test]
fn fuzzed_bytes_are_fingerprinted_or_refused_and_never_panic() {
    let inputs: u32 = std::env::var("FUZZ_INPUTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let mut runner = TestRunner::deterministic();
    let seed = (
        "[a-z]{1,8}",
        "[a-z]{1,8}",
        object(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..4),
    );
    let random = prop::collection::vec(any::<u8>(), 0..256);
    let (mut fingerprinted, mut refused) = (0u32, 0u32);
    let started = std::time::Instant::now();
    for i in 0..inputs {
        let bytes = if i % 2 == 0 {
            let (agent, action, parameters, edits) = seed
                .new_tree(&mut runner)
                .expect("a generated seed")
                .current();
            let mut bytes = request(&agent, &action, &parameters).encode_to_vec();
            for (at, byte, how) in edits {
                if bytes.is_empty() {
                    break;
                }
                let at = at.index(bytes.len());
                match how {
                    0 => bytes[at] ^= byte | 1,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, byte),
                }
            }
            bytes
        } else {
            random
                .new_tree(&mut runner)
                .expect("random bytes")
                .current()
        };
        match fingerprint_of_bytes(&bytes) {
            Ok(_) => fingerprinted += 1,
            Err(reason) => {
                assert!(!reason.is_empty(), "a refusal says why");
                refused += 1;
            }
        }
    }
    assert_eq!(fingerprinted + refused, inputs);
    assert!(fingerprinted > 0 && refused > 0, "both outcomes occur");
    println!(
        "fuzz: {inputs} inputs in {:.1} s: {fingerprinted} fingerprinted, {refused} refused, no panic",
        started.elapsed().as_secs_f64()
    );
}
