//! The request fingerprint: SHA-256 over the canonical JSON form of the
//! method name and the whole request. It decides "same request or not".
//!
//! The document hashed is, in canonical form (RFC 8785):
//! `{"method":"tasks.v1.TaskService/CreateTask","request":{"action":A,"agent_id":B,"parameters":P}}`
//! where an unset `parameters` is `{}`.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::domain::{NewTask, canonical_json};

/// A SHA-256 request fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a CreateTask-shaped request to `method`.
    pub fn of_new_task(method: &str, task: &NewTask) -> Self {
        Self::of_canonical_json(&canonical_document(method, task))
    }

    /// Hashes a document that is already canonical JSON.
    pub fn of_canonical_json(document: &str) -> Self {
        Self(Sha256::digest(document.as_bytes()).into())
    }

    /// The digest in lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

/// The canonical document, assembled from parts already in canonical form
/// (member names are written in sorted order) so `parameters` are not copied.
fn canonical_document(method: &str, task: &NewTask) -> String {
    let string = |s: &str| canonical_json::to_string(&serde_json::Value::String(s.to_owned()));
    format!(
        r#"{{"method":{},"request":{{"action":{},"agent_id":{},"parameters":{}}}}}"#,
        string(method),
        string(&task.action),
        string(&task.agent_id),
        task.parameters_json
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Limits;
    use crate::proto::tasks_v1::CreateTaskRequest;
    use oncely_client::json::object_to_struct;
    use serde_json::json;

    fn task(parameters: serde_json::Value) -> NewTask {
        let request = CreateTaskRequest {
            agent_id: "agent-7".into(),
            action: "send_email".into(),
            parameters: Some(object_to_struct(parameters.as_object().unwrap())),
        };
        NewTask::parse(request, &Limits::default()).unwrap()
    }

    #[test]
    fn the_document_is_the_canonical_form_of_method_and_request() {
        let t = task(json!({"to": "a@b.c", "n": 1.0}));
        let whole = json!({
            "request": {"parameters": {"to": "a@b.c", "n": 1.0}, "agent_id": "agent-7", "action": "send_email"},
            "method": "tasks.v1.TaskService/CreateTask",
        });
        assert_eq!(
            canonical_document("tasks.v1.TaskService/CreateTask", &t),
            canonical_json::to_string(&whole)
        );
    }

    #[test]
    fn a_known_request_has_a_known_fingerprint() {
        // Reproducible by any client: sha256 of the canonical document.
        let t = task(json!({"n": 1}));
        let fp = Fingerprint::of_new_task("tasks.v1.TaskService/CreateTask", &t);
        let doc = r#"{"method":"tasks.v1.TaskService/CreateTask","request":{"action":"send_email","agent_id":"agent-7","parameters":{"n":1}}}"#;
        assert_eq!(fp, Fingerprint::of_canonical_json(doc));
        assert_eq!(
            format!("{fp:?}"),
            format!("Fingerprint({})", hex(&Sha256::digest(doc.as_bytes())))
        );
    }

    #[test]
    fn any_field_changes_the_fingerprint() {
        let method = "tasks.v1.TaskService/CreateTask";
        let base = Fingerprint::of_new_task(method, &task(json!({"n": 1})));
        assert_ne!(
            base,
            Fingerprint::of_new_task(method, &task(json!({"n": 2})))
        );
        assert_ne!(
            base,
            Fingerprint::of_new_task("other/Method", &task(json!({"n": 1})))
        );
        let mut other_agent = task(json!({"n": 1}));
        other_agent.agent_id = "agent-8".into();
        assert_ne!(base, Fingerprint::of_new_task(method, &other_agent));
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
