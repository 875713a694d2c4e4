"""Calls carry the caller's OpenTelemetry trace context: the server's log
lines for the call name the agent's trace."""

from __future__ import annotations

import json
import uuid

from conftest import StartServer
from opentelemetry.sdk.trace import TracerProvider

from oncely import Client


def test_a_call_carries_the_current_trace_context(start_server: StartServer) -> None:
    server = start_server(LOG_FORMAT="json", RUST_LOG="info")
    tracer = TracerProvider().get_tracer("agent")

    with Client(f"http://{server.address}") as client:
        with tracer.start_as_current_span("agent step") as span:
            created = client.create_task(f"agent-{uuid.uuid4()}", "send_email", {"to": "ada@example.com"})
            trace_id = format(span.get_span_context().trace_id, "032x")
        # Outside any span, nothing is sent.
        client.create_task(f"agent-{uuid.uuid4()}", "send_email", {"to": "bob@example.com"})
    server.stop()

    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    calls = [
        line["spans"][0]
        for line in lines
        if line.get("message") == "done" and line.get("spans") and line["spans"][-1].get("name") == "CreateTask"
    ]
    assert len(calls) == 2, lines
    traced = [call for call in calls if call.get("trace_id") == trace_id]
    assert len(traced) == 1, (trace_id, calls)
    assert [call for call in calls if "trace_id" not in call], calls
    assert created.task.task_id
