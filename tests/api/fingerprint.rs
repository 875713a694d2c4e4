//! The fingerprint does not depend on field order, map order or wire
//! encoding: requests are hand-encoded here to control the bytes.

use crate::support::Backend;

use crate::support::{CREATE_TASK_PATH, TestApp, TestDb, new_key, replayed};

fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A length-delimited field.
fn field(tag: u8, bytes: &[u8]) -> Vec<u8> {
    [vec![tag], varint(bytes.len()), bytes.to_vec()].concat()
}

/// A length-delimited field whose length is written in two bytes, a legal but
/// non-minimal varint.
fn field_with_long_length(tag: u8, bytes: &[u8]) -> Vec<u8> {
    assert!(bytes.len() < 128);
    [vec![tag, bytes.len() as u8 | 0x80, 0x00], bytes.to_vec()].concat()
}

fn string_value(s: &str) -> Vec<u8> {
    field(0x1a, s.as_bytes())
}

fn number_value(x: f64) -> Vec<u8> {
    [vec![0x11], x.to_le_bytes().to_vec()].concat()
}

/// One `map<string, Value>` entry, key first or value first.
fn entry(key: &str, value: &[u8], value_first: bool) -> Vec<u8> {
    let (k, v) = (field(0x0a, key.as_bytes()), field(0x12, value));
    field(
        0x0a,
        &if value_first {
            [v, k].concat()
        } else {
            [k, v].concat()
        },
    )
}

fn parameters(entries: &[Vec<u8>]) -> Vec<u8> {
    field(0x1a, &entries.concat())
}

async fn equal_requests_share_a_fingerprint_whatever_their_encoding(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let agent = field(0x0a, b"agent-7");
    let action = field(0x12, b"send_email");
    let to = ("to", string_value("ada@example.com"));
    let n = ("n", number_value(2.5));
    let canonical = [
        agent.clone(),
        action.clone(),
        parameters(&[entry(to.0, &to.1, false), entry(n.0, &n.1, false)]),
    ]
    .concat();
    let reordered = [
        parameters(&[entry(n.0, &n.1, false), entry(to.0, &to.1, false)]),
        action.clone(),
        agent.clone(),
    ]
    .concat();
    let odd_encoding = [
        // A repeated scalar field: the last value wins.
        field(0x0a, b"someone-else"),
        field_with_long_length(0x12, b"send_email"),
        parameters(&[entry(n.0, &n.1, true), entry(to.0, &to.1, true)]),
        agent.clone(),
    ]
    .concat();
    let key = new_key();

    let first = app
        .raw_call(CREATE_TASK_PATH, Some(&key), canonical)
        .await
        .expect("create");
    for variant in [reordered.clone(), odd_encoding] {
        let retry = app
            .raw_call(CREATE_TASK_PATH, Some(&key), variant)
            .await
            .expect("replay");
        assert_eq!(replayed(&retry), Some("true"));
        assert_eq!(retry.get_ref(), first.get_ref());
    }
    // The same request under another key is a new task with the same fingerprint.
    app.raw_call(CREATE_TASK_PATH, Some(&new_key()), reordered)
        .await
        .expect("create under another key");
    let fingerprints = db.fingerprints().await;
    assert_eq!(fingerprints.len(), 2);
    assert_eq!(fingerprints[0], fingerprints[1]);
    assert_eq!(db.count("tasks").await, 2);
}

async fn the_stored_fingerprint_is_sha256_of_the_documented_canonical_json(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let body = [
        field(0x0a, b"agent-7"),
        field(0x12, b"send_email"),
        parameters(&[
            entry("b", &number_value(1.0), false),
            entry("a", &number_value(1e21), false),
        ]),
    ]
    .concat();

    app.raw_call(CREATE_TASK_PATH, Some(&new_key()), body)
        .await
        .expect("create");

    let stored = db.fingerprints().await.remove(0);
    let document = r#"{"method":"tasks.v1.TaskService/CreateTask","request":{"action":"send_email","agent_id":"agent-7","parameters":{"a":1e+21,"b":1}}}"#;
    let expected = oncely::idempotency::Fingerprint::of_canonical_json(document);
    assert_eq!(stored, expected.as_bytes());
}

conformance!(
    equal_requests_share_a_fingerprint_whatever_their_encoding,
    the_stored_fingerprint_is_sha256_of_the_documented_canonical_json,
);
