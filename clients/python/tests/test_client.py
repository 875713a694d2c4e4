"""The client against a live oncely server (see conftest.py): no fakes, no
mocks of the service."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timezone
from pathlib import Path

import grpc
import pytest
from conftest import AttemptCounter, CountedChannel, Server, StartServer, eventually, free_port

from oncely import Client, GaveUp, Rejected, RetryPolicy
from oncely._errors import error_reason, retry_delay, rpc_status
from oncely._proto.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from oncely._wire import channel_options

# Short waits, so that tests of transient failures run quickly.
QUICK = RetryPolicy(max_attempts=50, initial_backoff=0.05, max_backoff=0.2, total_timeout=30.0)
# As quick, and patient enough to outlast a server starting on a busy machine.
PATIENT = RetryPolicy(max_attempts=100_000, initial_backoff=0.05, max_backoff=0.2, total_timeout=120.0)


def new_agent() -> str:
    """An agent id no other test uses."""
    return f"agent-{uuid.uuid4()}"


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(f"http://{server.address}") as client:
        yield client


@contextmanager
def write_locked(database: Path) -> Iterator[sqlite3.Connection]:
    """Holds the SQLite database's write lock (``BEGIN IMMEDIATE``) until the
    block ends or ``ROLLBACK`` is executed on the connection."""
    connection = sqlite3.connect(database, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield connection
    finally:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        connection.close()


def release_after_attempts(connection: sqlite3.Connection, counter: AttemptCounter, attempts: int) -> threading.Thread:
    """Releases the lock held by ``connection`` once ``counter`` has seen
    ``attempts`` CreateTask attempts leave the client, so that the client
    surely met the lock that many times less one, however slowly this
    machine runs (or after 60 s, when it never does)."""

    def release() -> None:
        deadline = time.monotonic() + 60
        while counter.count("CreateTask") < attempts and time.monotonic() < deadline:
            time.sleep(0.01)
        connection.execute("ROLLBACK")

    releaser = threading.Thread(target=release)
    releaser.start()
    return releaser


def test_create_returns_a_queued_task_under_a_new_uuid4_key(client: Client) -> None:
    agent = new_agent()
    created = client.create_task(agent, "send_email", {"to": "ada@example.com", "subject": "hello"})

    assert not created.replayed
    assert created.attempts == 1
    assert uuid.UUID(created.key).version == 4
    assert str(uuid.UUID(created.key)) == created.key
    task = created.task
    assert uuid.UUID(task.task_id)
    assert (task.agent_id, task.action, task.status) == (agent, "send_email", "QUEUED")
    assert task.parameters == {"to": "ada@example.com", "subject": "hello"}
    assert task.result is None
    assert task.create_time.tzinfo is timezone.utc
    assert task.proto.task_id == task.task_id


def test_the_same_key_and_request_again_is_a_replay_of_the_same_task(client: Client) -> None:
    agent = new_agent()
    first = client.create_task(agent, "send_email", {"to": "ada@example.com", "subject": "hello"})
    again = client.create_task(
        agent, "send_email", {"subject": "hello", "to": "ada@example.com"}, idempotency_key=first.key
    )

    assert again.replayed
    assert again.task == first.task
    assert (again.key, again.attempts) == (first.key, 1)
    assert [task.task_id for task in client.iter_tasks(agent)] == [first.task.task_id]


def test_the_same_key_with_another_request_is_refused_after_one_attempt(
    server: Server, counted_channel: CountedChannel
) -> None:
    channel, counter = counted_channel(server.address)
    client = Client(channel=channel)
    agent = new_agent()
    first = client.create_task(agent, "send_email", {"to": "ada@example.com"})
    sent_before = counter.count("CreateTask")

    with pytest.raises(Rejected) as refused:
        client.create_task(agent, "send_sms", {"to": "ada@example.com"}, idempotency_key=first.key)

    error = refused.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert (error.attempts, error.key) == (1, first.key)
    assert counter.count("CreateTask") == sent_before + 1
    # The key still answers for its original request.
    assert client.create_task(agent, "send_email", {"to": "ada@example.com"}, idempotency_key=first.key).replayed


def test_an_invalid_request_is_refused_with_the_field_named(server: Server, counted_channel: CountedChannel) -> None:
    channel, counter = counted_channel(server.address)
    client = Client(channel=channel)

    with pytest.raises(Rejected) as refused:
        client.create_task("", "send_email")

    error = refused.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_REQUEST"
    assert [field for field, _ in error.field_violations] == ["agent_id"]
    assert error.attempts == 1
    assert counter.count("CreateTask") == 1


def test_get_task_returns_the_created_task(client: Client) -> None:
    created = client.create_task(new_agent(), "send_email", {"nested": {"list": [1, "two", None, True]}})

    task = client.get_task(created.task.task_id)

    assert task == created.task
    assert task.parameters == {"nested": {"list": [1.0, "two", None, True]}}


def test_get_task_of_an_unknown_id_is_not_found(client: Client) -> None:
    with pytest.raises(Rejected) as refused:
        client.get_task(str(uuid.uuid4()))
    assert refused.value.code == grpc.StatusCode.NOT_FOUND


def test_list_tasks_pages_and_iter_tasks_follows_the_tokens(client: Client) -> None:
    agent = new_agent()
    created = [client.create_task(agent, "step", {"n": n}).task.task_id for n in range(5)]

    pages = []
    token = ""
    while True:
        page = client.list_tasks(agent, page_size=2, page_token=token)
        pages.append([task.task_id for task in page.tasks])
        token = page.next_page_token
        if not token:
            break

    assert pages == [created[0:2], created[2:4], created[4:5]]
    assert [task.task_id for task in client.iter_tasks(agent, page_size=2)] == created
    assert [task.task_id for task in client.iter_tasks(agent)] == created
    assert list(client.iter_tasks(new_agent())) == []


def test_nothing_listening_gives_up_after_max_attempts_with_unavailable() -> None:
    # Nothing is started on this port: should another process take it
    # meanwhile, that process (no gRPC server) would refuse the calls too.
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    with Client(f"127.0.0.1:{free_port()}", retry_policy=policy) as client, pytest.raises(GaveUp) as gave_up:
        client.create_task(new_agent(), "send_email")

    error = gave_up.value
    assert error.attempts == 3
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.key is not None and uuid.UUID(error.key).version == 4


def test_aborted_with_retry_info_is_retried_no_sooner_than_asked(
    start_server: StartServer, counted_channel: CountedChannel
) -> None:
    server = start_server(IN_FLIGHT_WAIT="200ms")
    agent = new_agent()
    with write_locked(server.database) as lock:
        # While the database is locked, a create answers ABORTED with a
        # RetryInfo of one second.
        with grpc.insecure_channel(server.address) as probe, pytest.raises(grpc.RpcError) as aborted:
            tasks_pb2_grpc.TaskServiceStub(probe).CreateTask(
                tasks_pb2.CreateTaskRequest(agent_id=agent, action="probe"),
                metadata=[("idempotency-key", str(uuid.uuid4()))],
                timeout=10,
            )
        assert aborted.value.code() == grpc.StatusCode.ABORTED
        status = rpc_status(aborted.value.trailing_metadata())
        assert error_reason(status) == "IDEMPOTENCY_REQUEST_IN_PROGRESS"
        assert retry_delay(status) == 1.0

        # The client's own backoff is far shorter than the RetryInfo delay.
        channel, counter = counted_channel(server.address)
        client = Client(channel=channel, retry_policy=QUICK)
        # The lock goes once a second attempt is sent: the first surely met it.
        release = release_after_attempts(lock, counter, 2)
        began = time.monotonic()
        created = client.create_task(agent, "send_email")
        elapsed = time.monotonic() - began
        release.join()

    assert created.attempts >= 2
    assert elapsed >= 1.0
    starts = counter.starts("CreateTask")
    assert len(starts) == created.attempts
    assert all(later - earlier >= 1.0 for earlier, later in zip(starts, starts[1:]))
    assert [task.task_id for task in client.iter_tasks(agent)] == [created.task.task_id]


def test_attempts_that_time_out_while_the_server_works_create_one_task(
    start_server: StartServer, counted_channel: CountedChannel
) -> None:
    server = start_server(IN_FLIGHT_WAIT="5s")
    agent = new_agent()
    policy = RetryPolicy(
        max_attempts=50, initial_backoff=0.05, max_backoff=0.2, attempt_timeout=0.5, total_timeout=30.0
    )
    channel, counter = counted_channel(server.address, options=channel_options(policy))
    with Client(channel=channel, retry_policy=policy) as client:
        with write_locked(server.database) as lock:
            # Each attempt waits for the database longer than its deadline,
            # until the lock goes (once a second attempt is sent). A write
            # whose attempt timed out may still complete on the server;
            # later attempts then get its task.
            release = release_after_attempts(lock, counter, 2)
            created = client.create_task(agent, "send_email", {"to": "ada@example.com"})
            release.join()

        assert created.attempts >= 2
        assert [task.task_id for task in client.iter_tasks(agent)] == [created.task.task_id]


def test_a_create_retried_until_the_server_is_up_creates_one_task(
    start_server: StartServer, counted_channel: CountedChannel
) -> None:
    port = free_port()
    agent = new_agent()
    # The client's own channel options, so that it reconnects as quickly.
    channel, counter = counted_channel(f"127.0.0.1:{port}", options=channel_options(PATIENT))
    with Client(channel=channel, retry_policy=PATIENT) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.create_task, agent, "send_email", {"to": "ada@example.com"})
        # Attempts fail while nothing listens: a second one was sent.
        eventually(lambda: counter.count("CreateTask") >= 2 or pending.done(), "a second attempt")
        assert not pending.done(), pending.exception()
        start_server(port=port)  # waits while another process holds the port
        created = pending.result(timeout=180)

        assert created.attempts >= 2
        assert not created.replayed
        assert [task.task_id for task in client.iter_tasks(agent)] == [created.task.task_id]
