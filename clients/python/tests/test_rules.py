"""Unit tests of the rules that need no server: keys, backoff, error details,
addresses and the conversion of messages."""

from __future__ import annotations

import pickle
import uuid
from datetime import datetime, timezone

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

import oncely

from oncely import (
    TRANSIENT_CODES,
    Client,
    GaveUp,
    Rejected,
    RetryPolicy,
    Task,
    backoff_delay,
    new_idempotency_key,
)
from oncely._client import channel_target
from oncely._errors import STATUS_DETAILS_KEY, error_reason, field_violations, retry_delay, rpc_status
from oncely._proto.tasks.v1 import tasks_pb2
from oncely._retry import backoff_ceiling


def packed(message: Message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def trailers(*details: Message) -> list[tuple[str, str | bytes]]:
    status = status_pb2.Status(code=10, message="x", details=[packed(d) for d in details])
    return [("date", "today"), (STATUS_DETAILS_KEY, status.SerializeToString())]


def test_keys_are_distinct_canonical_uuid4s() -> None:
    keys = {new_idempotency_key() for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        parsed = uuid.UUID(key)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == key


def test_the_backoff_ceiling_doubles_up_to_the_maximum() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=5.0)
    ceilings = [backoff_ceiling(policy, attempt) for attempt in range(1, 10)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert backoff_ceiling(policy, 10_000) == 5.0


def test_the_backoff_is_full_jitter_below_the_ceiling() -> None:
    policy = RetryPolicy()
    for attempt in range(1, 40):
        ceiling = backoff_ceiling(policy, attempt)
        assert backoff_delay(policy, attempt, rand=lambda: 0.0) == 0.0
        assert backoff_delay(policy, attempt, rand=lambda: 0.5) == pytest.approx(ceiling / 2)
        assert 0.0 <= backoff_delay(policy, attempt) <= ceiling <= policy.max_backoff


def test_the_backoff_is_never_shorter_than_the_servers_retry_info() -> None:
    policy = RetryPolicy()
    assert backoff_delay(policy, 1, server_delay=1.0, rand=lambda: 0.999) == 1.0
    assert backoff_delay(policy, 8, server_delay=1.0, rand=lambda: 0.5) == 2.5


def test_only_transient_codes_are_retried() -> None:
    assert TRANSIENT_CODES == {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
    assert grpc.StatusCode.INVALID_ARGUMENT not in TRANSIENT_CODES
    assert grpc.StatusCode.FAILED_PRECONDITION not in TRANSIENT_CODES


def test_resource_exhausted_is_retried_only_when_the_server_says_when() -> None:
    assert oncely.is_transient(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.5)
    assert not oncely.is_transient(grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    assert oncely.is_transient(grpc.StatusCode.UNAVAILABLE, None)
    assert not oncely.is_transient(grpc.StatusCode.INVALID_ARGUMENT, 1.0)


@pytest.mark.parametrize(
    "changes",
    [{"max_attempts": 0}, {"initial_backoff": -1}, {"max_backoff": -1}, {"attempt_timeout": 0}, {"total_timeout": 0}],
)
def test_a_retry_policy_that_cannot_work_is_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**changes)  # type: ignore[arg-type]


def test_retry_info_is_read_from_the_status_details() -> None:
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000))
    status = rpc_status(trailers(error_details_pb2.ErrorInfo(reason="R", domain="oncely"), info))
    assert retry_delay(status) == 1.5


def test_errors_without_details_ask_for_no_delay() -> None:
    assert rpc_status(None) is None
    assert rpc_status([("date", "today")]) is None
    assert rpc_status([(STATUS_DETAILS_KEY, b"\xff\xff not a status")]) is None
    assert retry_delay(None) == 0.0
    assert retry_delay(rpc_status(trailers(error_details_pb2.ErrorInfo(reason="R", domain="oncely")))) == 0.0


def test_the_reason_is_oncelys_error_info_only() -> None:
    foreign = error_details_pb2.ErrorInfo(reason="PROXY_REASON", domain="proxy.example.com")
    ours = error_details_pb2.ErrorInfo(reason="IDEMPOTENCY_KEY_REUSED", domain="oncely")
    assert error_reason(rpc_status(trailers(foreign, ours))) == "IDEMPOTENCY_KEY_REUSED"
    assert error_reason(rpc_status(trailers(foreign))) is None
    assert error_reason(None) is None


def test_field_violations_are_read_from_bad_request() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="agent_id", description="agent_id is required"),
            error_details_pb2.BadRequest.FieldViolation(field="action", description="action is required"),
        ]
    )
    assert field_violations(rpc_status(trailers(bad))) == [
        ("agent_id", "agent_id is required"),
        ("action", "action is required"),
    ]
    assert field_violations(None) == []


def test_errors_describe_themselves_and_survive_pickling() -> None:
    status = rpc_status(trailers(error_details_pb2.ErrorInfo(reason="IDEMPOTENCY_KEY_REUSED", domain="oncely")))
    refused = Rejected(grpc.StatusCode.FAILED_PRECONDITION, "reused", status=status, attempts=1, key="k")
    assert str(refused) == "the server refused the request: FAILED_PRECONDITION: reused (reason IDEMPOTENCY_KEY_REUSED)"
    gave_up = GaveUp(grpc.StatusCode.UNAVAILABLE, "down", attempts=6, key="k")
    assert str(gave_up) == "gave up after 6 attempts: UNAVAILABLE: down"
    copy = pickle.loads(pickle.dumps(refused))
    assert (copy.code, copy.reason, copy.attempts, copy.key) == (refused.code, refused.reason, 1, "k")


def test_addresses_accept_host_port_and_http_urls() -> None:
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("http://127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("HTTP://localhost:50051/") == "localhost:50051"
    assert channel_target("dns:///oncely.internal:50051") == "dns:///oncely.internal:50051"
    assert channel_target("https://oncely.example.com:443") == "oncely.example.com:443"
    with pytest.raises(ValueError):
        channel_target("http://")


def test_a_client_needs_a_target_or_a_channel() -> None:
    with pytest.raises(ValueError):
        Client()
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError):
        Client("127.0.0.1:1", channel=channel)
    with Client("https://127.0.0.1:50051") as secure:
        assert secure.retry_policy == RetryPolicy()


@pytest.mark.parametrize("key", ["", "has space", "ключ", "x" * 256, "tab\there"])
def test_keys_the_server_would_refuse_are_not_sent(key: str) -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(ValueError, match="visible ASCII"):
        client.create_task("agent", "action", idempotency_key=key)


def test_a_task_is_built_from_its_message() -> None:
    message = tasks_pb2.Task(
        task_id="6f1c9f3e-2d8a-4a57-9f5e-0c1d2e3f4a5b",
        agent_id="agent-7",
        action="send_email",
        status=tasks_pb2.TASK_STATUS_SUCCEEDED,
    )
    message.parameters.update({"to": "ada@example.com", "n": 2})
    message.create_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    message.result.update({"ok": True})

    task = Task.from_proto(message)

    assert task.status == "SUCCEEDED"
    assert task.parameters == {"to": "ada@example.com", "n": 2.0}
    assert task.result == {"ok": True}
    assert task.create_time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert task.create_time.tzinfo is timezone.utc
    assert task.proto is message
    assert hash(task) == hash(Task.from_proto(message))


def test_a_task_without_result_or_a_known_status() -> None:
    task = Task.from_proto(tasks_pb2.Task(status=42))  # type: ignore[arg-type]  # a status newer than the stubs
    assert task.result is None
    assert task.parameters == {}
    assert task.status == "42"
    assert Task.from_proto(tasks_pb2.Task()).status == "UNSPECIFIED"
