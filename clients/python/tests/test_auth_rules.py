"""API keys without a server: which key a client sends, that every call
sends it, and that it never shows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import free_port

import oncely
from oncely import API_KEY_ENV, TRANSIENT_CODES, Client, GaveUp, Lease, RetryPolicy
from oncely._auth import AUTHORIZATION_HEADER, auth_metadata, resolve_api_key
from oncely._proto.tasks.v1 import tasks_pb2, worker_pb2

TOKEN = "oncely_" + "A" * 43
OTHER = "oncely_" + "B" * 43

# One quick attempt: the calls below go to a port nothing listens on.
ONCE = RetryPolicy(max_attempts=1, attempt_timeout=2.0, total_timeout=2.0)


class MetadataRecorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records the metadata of each call as it leaves the client."""

    def __init__(self) -> None:
        self.sent: dict[str, list[tuple[str, str]]] = {}

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        method = client_call_details.method.rsplit("/", 1)[-1]
        self.sent[method] = list(client_call_details.metadata or ())
        return continuation(client_call_details, request)


@pytest.fixture
def recorded() -> Iterator[tuple[grpc.Channel, MetadataRecorder]]:
    recorder = MetadataRecorder()
    # Nothing is started on this port: the calls are meant to fail, and
    # would fail as well should another process take the port meanwhile
    # (it speaks no oncely, and never sees a key it could accept).
    channel = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{free_port()}"), recorder)
    yield channel, recorder
    channel.close()


def a_lease() -> Lease:
    message = worker_pb2.Lease(lease_token="token", task=tasks_pb2.Task(task_id=str(uuid.uuid4())))
    return Lease.from_proto(message)


def call_everything(client: Client) -> None:
    """Makes every call of the client once; each fails (nobody listens)."""
    task_id = str(uuid.uuid4())
    calls = [
        lambda: client.create_task("agent-7", "send_email", {"to": "ada@example.com"}),
        lambda: client.get_task(task_id),
        lambda: client.list_tasks("agent-7"),
        lambda: client.wait_task(task_id, timeout=1),
        lambda: client.cancel_task(task_id),
        lambda: client.lease_tasks("w", ["send_email"]),
        lambda: client.renew_lease(a_lease()),
        lambda: client.complete_task(a_lease(), {"ok": True}),
        lambda: client.fail_task(a_lease(), "boom"),
    ]
    for call in calls:
        with pytest.raises(GaveUp):
            call()


ALL_METHODS = {
    "CreateTask",
    "GetTask",
    "ListTasks",
    "WaitTask",
    "CancelTask",
    "LeaseTasks",
    "RenewLease",
    "CompleteTask",
    "FailTask",
}


def test_every_call_sends_the_key_as_a_bearer_token(recorded: tuple[grpc.Channel, MetadataRecorder]) -> None:
    channel, recorder = recorded
    call_everything(Client(channel=channel, api_key=TOKEN, retry_policy=ONCE))

    assert set(recorder.sent) == ALL_METHODS
    for method, metadata in recorder.sent.items():
        assert (AUTHORIZATION_HEADER, f"Bearer {TOKEN}") in metadata, method
        assert [key for key, _ in metadata].count(AUTHORIZATION_HEADER) == 1, method
    # The idempotency key still goes with a create.
    assert "idempotency-key" in dict(recorder.sent["CreateTask"])


def test_without_a_key_no_authorization_is_sent(
    recorded: tuple[grpc.Channel, MetadataRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    channel, recorder = recorded
    call_everything(Client(channel=channel, retry_policy=ONCE))

    assert set(recorder.sent) == ALL_METHODS
    for method, metadata in recorder.sent.items():
        assert AUTHORIZATION_HEADER not in dict(metadata), method


def test_the_key_defaults_to_the_environment(
    recorded: tuple[grpc.Channel, MetadataRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, f"{TOKEN}\n")
    channel, recorder = recorded
    client = Client(channel=channel, retry_policy=ONCE)
    assert client.has_api_key
    with pytest.raises(GaveUp):
        client.get_task(str(uuid.uuid4()))
    assert dict(recorder.sent["GetTask"])[AUTHORIZATION_HEADER] == f"Bearer {TOKEN}"

    # A key passed in wins; "" sends none, whatever the environment says.
    with pytest.raises(GaveUp):
        Client(channel=channel, api_key=OTHER, retry_policy=ONCE).get_task(str(uuid.uuid4()))
    assert dict(recorder.sent["GetTask"])[AUTHORIZATION_HEADER] == f"Bearer {OTHER}"
    explicit_none = Client(channel=channel, api_key="", retry_policy=ONCE)
    assert not explicit_none.has_api_key
    with pytest.raises(GaveUp):
        explicit_none.get_task(str(uuid.uuid4()))
    assert AUTHORIZATION_HEADER not in dict(recorder.sent["GetTask"])


def test_which_key_is_sent() -> None:
    assert resolve_api_key(TOKEN, environ={}) == TOKEN
    assert resolve_api_key(f"  {TOKEN}\n", environ={}) == TOKEN
    assert resolve_api_key(None, environ={API_KEY_ENV: TOKEN}) == TOKEN
    assert resolve_api_key(OTHER, environ={API_KEY_ENV: TOKEN}) == OTHER
    assert resolve_api_key(None, environ={}) is None
    assert resolve_api_key(None, environ={API_KEY_ENV: "  "}) is None
    assert resolve_api_key("", environ={API_KEY_ENV: TOKEN}) is None
    assert auth_metadata(None) == ()
    assert auth_metadata(TOKEN) == (("authorization", f"Bearer {TOKEN}"),)


@pytest.mark.parametrize("bad", ["Bearer oncely_secret", "oncely_sécret", "one\ntwo_secret", "tab\tsecret"])
def test_a_key_that_cannot_be_metadata_is_refused_without_showing_it(bad: str) -> None:
    with pytest.raises(ValueError) as refused:
        resolve_api_key(bad, environ={})
    assert "secret" not in str(refused.value)
    assert "api_key" in str(refused.value)
    with pytest.raises(ValueError) as from_env:
        resolve_api_key(None, environ={API_KEY_ENV: bad})
    assert "secret" not in str(from_env.value)
    assert API_KEY_ENV in str(from_env.value)
    with pytest.raises(ValueError):
        Client("127.0.0.1:50051", api_key=bad)
    with pytest.raises(TypeError):
        Client("127.0.0.1:50051", api_key=b"oncely_bytes")  # type: ignore[arg-type]


def test_repr_never_shows_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with Client("http://127.0.0.1:50051", api_key=TOKEN) as client:
        assert repr(client) == "Client(target='127.0.0.1:50051', api_key='***')"
        assert TOKEN not in str(client)
        assert TOKEN not in f"{client!r} {client!s} {[client]}"
    with Client("127.0.0.1:50051") as client:
        assert repr(client) == "Client(target='127.0.0.1:50051', api_key=None)"
    monkeypatch.setenv(API_KEY_ENV, TOKEN)
    with Client("127.0.0.1:50051") as client:
        assert TOKEN not in repr(client) and "***" in repr(client)
    worker = oncely.Worker(client, "w", ["send_email"], lambda task: None)
    assert TOKEN not in repr(worker.client)


def test_refusals_of_the_key_are_never_retried() -> None:
    assert grpc.StatusCode.UNAUTHENTICATED not in TRANSIENT_CODES
    assert grpc.StatusCode.PERMISSION_DENIED not in TRANSIENT_CODES
