"""API keys against a live oncely server whose database holds keys (see
``keyed_server`` in conftest.py): who may call what, and revocation."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from conftest import KeyedServer

from oncely import API_KEY_ENV, Client, Rejected, Task, Worker

# Revocation reaches a running server at its next key refresh (2 s by
# default); the rest is room for a busy machine.
REVOKED_WITHIN = 30.0

UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
PERMISSION_DENIED = (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture
def clients(keyed_server: KeyedServer) -> Iterator[Callable[[str], Client]]:
    """Makes clients of the keyed server: ``clients(token)``, ``""`` for one
    without a key. All are closed after the test."""
    made: list[Client] = []

    def make(api_key: str) -> Client:
        client = Client(keyed_server.address, api_key=api_key)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def refused(call: Callable[[], Any]) -> Rejected:
    """The Rejected that ``call`` raises, after a single attempt."""
    with pytest.raises(Rejected) as error:
        call()
    assert error.value.attempts == 1, "a refusal of the key must not be retried"
    return error.value


def refusal(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str | None]:
    error = refused(call)
    return error.code, error.reason


def test_without_a_key_every_call_is_unauthenticated(clients: Callable[[str], Client]) -> None:
    anonymous = clients("")
    assert not anonymous.has_api_key

    assert refusal(lambda: anonymous.create_task("agent-7", "send_email", {"to": "ada@example.com"})) == UNAUTHENTICATED
    assert refusal(lambda: anonymous.get_task(str(uuid.uuid4()))) == UNAUTHENTICATED
    assert refusal(lambda: anonymous.list_tasks("agent-7")) == UNAUTHENTICATED
    assert refusal(lambda: anonymous.wait_task(str(uuid.uuid4()), timeout=1)) == UNAUTHENTICATED
    assert refusal(lambda: anonymous.lease_tasks("w", ["send_email"])) == UNAUTHENTICATED
    unknown = clients("oncely_" + "A" * 43)
    assert refusal(lambda: unknown.list_tasks("agent-7")) == UNAUTHENTICATED


def test_an_agent_key_acts_only_for_its_agent_ids(keyed_server: KeyedServer, clients: Callable[[str], Client]) -> None:
    agent = clients(keyed_server.tokens["agent-7"])
    admin = clients(keyed_server.tokens["admin"])

    created = agent.create_task("agent-7", "send_email", {"to": "ada@example.com"})
    assert created.task.agent_id == "agent-7" and not created.replayed
    assert agent.get_task(created.task.task_id) == created.task
    assert [t.task_id for t in agent.list_tasks("agent-7").tasks] == [created.task.task_id]
    assert agent.wait_task(created.task.task_id, timeout=0).status == "QUEUED"
    assert agent.cancel_task(created.task.task_id).status == "CANCELLED"

    assert refusal(lambda: agent.create_task("agent-8", "send_email", {"to": "ada@example.com"})) == PERMISSION_DENIED
    # Another agent's task is answered as one that does not exist.
    theirs = admin.create_task("agent-8", "send_email", {"to": "bob@example.com"}).task
    assert refused(lambda: agent.get_task(theirs.task_id)).code == NOT_FOUND
    assert refused(lambda: agent.wait_task(theirs.task_id, timeout=1)).code == NOT_FOUND
    assert refused(lambda: agent.cancel_task(theirs.task_id)).code == NOT_FOUND
    assert refused(lambda: agent.list_tasks("agent-8")).code == NOT_FOUND
    assert admin.get_task(theirs.task_id).status == "QUEUED"


def test_an_agent_key_cannot_lease(keyed_server: KeyedServer, clients: Callable[[str], Client]) -> None:
    agent = clients(keyed_server.tokens["agent-7"])

    assert refusal(lambda: agent.lease_tasks("w", ["send_email"])) == PERMISSION_DENIED
    # The Worker helper stops at once with the refusal: no retry can fix it.
    worker = Worker(agent, "mailer-1", ["send_email"], lambda task: None, concurrency=2, poll_wait=1)
    error = refused(lambda: worker.run(threading.Event()))
    assert (error.code, error.reason) == PERMISSION_DENIED


def test_a_worker_key_leases_and_completes(keyed_server: KeyedServer, clients: Callable[[str], Client]) -> None:
    agent = clients(keyed_server.tokens["agent-7"])
    mailer = clients(keyed_server.tokens["mailer"])
    created = agent.create_task("agent-7", "send_email", {"to": "ada@example.com"}).task

    [lease] = mailer.lease_tasks("mailer-1", ["send_email"], wait=10)
    assert lease.task.task_id == created.task_id
    renewed = mailer.renew_lease(lease, lease_duration=60)
    done = mailer.complete_task(renewed, {"message_id": "m-1"})
    assert (done.status, done.result) == ("SUCCEEDED", {"message_id": "m-1"})
    assert agent.wait_task(created.task_id, timeout=5).status == "SUCCEEDED"

    # Only its own service and actions.
    assert refusal(lambda: mailer.create_task("agent-7", "send_email")) == PERMISSION_DENIED
    assert refusal(lambda: mailer.lease_tasks("mailer-1", ["send_sms"])) == PERMISSION_DENIED

    # The Worker helper sends the client's key on every call.
    second = agent.create_task("agent-7", "send_email", {"to": "bob@example.com"}).task
    performed: list[Task] = []
    worker = Worker(
        mailer, "mailer-2", ["send_email"], lambda task: performed.append(task) or {"ok": True}, poll_wait=1
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        assert agent.wait_task(second.task_id, timeout=60).status == "SUCCEEDED"
    finally:
        stop.set()
        thread.join(timeout=30)
    assert [t.task_id for t in performed] == [second.task_id]


def test_an_admin_key_can_do_everything(keyed_server: KeyedServer, clients: Callable[[str], Client]) -> None:
    admin = clients(keyed_server.tokens["admin"])

    created = [admin.create_task(agent_id, "admin_action", {"n": 1}).task for agent_id in ("agent-7", "agent-8")]
    for task in created:
        assert admin.get_task(task.task_id) == task
        assert [t.task_id for t in admin.list_tasks(task.agent_id).tasks] == [task.task_id]
    first, second = admin.lease_tasks("admin-worker", ["admin_action"], max_tasks=2, wait=5)
    assert [first.task.task_id, second.task.task_id] == [t.task_id for t in created]
    assert admin.renew_lease(first).lease_token == first.lease_token
    assert admin.complete_task(first, {"done": True}).status == "SUCCEEDED"
    assert admin.fail_task(second, "no", permanent=True).status == "FAILED"
    assert admin.wait_task(first.task.task_id, timeout=1).status == "SUCCEEDED"
    third = admin.create_task("agent-9", "admin_action").task
    assert admin.cancel_task(third.task_id).status == "CANCELLED"


def test_the_key_is_taken_from_the_environment(keyed_server: KeyedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, keyed_server.tokens["agent-7"])
    with Client(keyed_server.address) as client:
        assert client.create_task("agent-7", "send_email", {"to": "ada@example.com"}).task.agent_id == "agent-7"
        assert refusal(lambda: client.create_task("agent-8", "send_email")) == PERMISSION_DENIED


def test_a_revoked_key_stops_working_within_seconds(
    keyed_server: KeyedServer, clients: Callable[[str], Client]
) -> None:
    agent = clients(keyed_server.tokens["doomed-agent"])
    worker_client = clients(keyed_server.tokens["doomed-worker"])
    assert agent.list_tasks("agent-7").tasks == ()
    # A running worker whose key is revoked stops with the refusal.
    worker = Worker(worker_client, "doomed", ["send_email"], lambda task: None, poll_wait=1)
    raised: list[BaseException] = []
    thread = threading.Thread(target=lambda: raised.extend(catch(lambda: worker.run(threading.Event()))))
    thread.start()

    keyed_server.revoke_key("doomed-agent")
    keyed_server.revoke_key("doomed-worker")
    deadline = time.monotonic() + REVOKED_WITHIN
    while True:
        try:
            agent.list_tasks("agent-7")
        except Rejected as error:
            assert (error.code, error.reason) == UNAUTHENTICATED
            break
        assert time.monotonic() < deadline, f"the revoked key still worked after {REVOKED_WITHIN}s"
        time.sleep(0.2)
    thread.join(timeout=REVOKED_WITHIN)
    assert not thread.is_alive(), "the worker went on with a revoked key"
    [error] = raised
    assert isinstance(error, Rejected) and (error.code, error.reason) == UNAUTHENTICATED
    # The other keys still work.
    assert clients(keyed_server.tokens["agent-7"]).list_tasks("agent-7").tasks == ()


def catch(call: Callable[[], Any]) -> list[BaseException]:
    """What ``call`` raised, as a list of zero or one error."""
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - the test looks at it
        return [error]
    return []
