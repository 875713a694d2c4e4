"""The server's JSON API, called with the standard library alone (an
independent HTTP client, as an agent without gRPC would), and its OpenAPI
document checked by an independent validator."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from conftest import Server


def call(server: Server, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None):
    """The status, headers and body bytes of one HTTP call."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{server.address}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_the_openapi_document_is_valid_openapi_3_1(server: Server) -> None:
    status, headers, body = call(server, "GET", "/v1/openapi.json")

    assert status == 200
    document = json.loads(body)
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/v1/tasks",
        "/v1/tasks/{task_id}",
        "/v1/tasks/{task_id}:wait",
        "/v1/tasks/{task_id}:cancel",
    }
    # The validator needs Python 3.10 or newer (requirements-dev.txt).
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(document)


def test_a_retry_over_http_gets_the_first_answer_byte_for_byte(server: Server) -> None:
    key = str(uuid.uuid4())
    request = {"agent_id": "py-http", "action": "send_email", "parameters": {"to": "ada@example.com"}}

    first = call(server, "POST", "/v1/tasks", request, {"Idempotency-Key": key})
    retry = call(server, "POST", "/v1/tasks", request, {"Idempotency-Key": key})
    reused = call(server, "POST", "/v1/tasks", {**request, "action": "send_sms"}, {"Idempotency-Key": key})

    assert first[0] == 201
    assert first[1]["Idempotent-Replayed"] == "false"
    task = json.loads(first[2])
    assert first[1]["Location"] == f"/v1/tasks/{task['taskId']}"
    assert retry[0] == 201
    assert retry[1]["Idempotent-Replayed"] == "true"
    assert retry[2] == first[2]
    assert reused[0] == 422
    assert reused[1]["Content-Type"] == "application/problem+json"
    assert json.loads(reused[2])["reason"] == "IDEMPOTENCY_KEY_REUSED"
