"""Workers and waiting against a live oncely server (see conftest.py):
leases, completions, failures, cancellation, WaitTask and the Worker
helper. Each test uses an action of its own, so that it leases only its
own tasks from the shared server."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
import pytest
from conftest import PATIENCE, AttemptCounter, CountedChannel, Server, StartServer, eventually, free_port, wait_until

import oncely._client
from oncely import Client, Handler, Lease, PermanentError, Rejected, RetryPolicy, Task, Worker
from oncely._wire import channel_options


def new_agent() -> str:
    """An agent id no other test uses."""
    return f"agent-{uuid.uuid4()}"


def new_action() -> str:
    """An action no other test uses."""
    return f"action-{uuid.uuid4()}"


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.address) as client:
        yield client


def lease_one(client: Client, action: str, **options: Any) -> Lease:
    """Leases the one task of ``action``, waiting up to 30 s for it (the
    call returns as soon as it is available)."""
    leases = client.lease_tasks(f"worker-{uuid.uuid4()}", [action], wait=30, **options)
    assert len(leases) == 1, leases
    return leases[0]


def refusal(error: pytest.ExceptionInfo[Rejected]) -> tuple[grpc.StatusCode, str | None]:
    return error.value.code, error.value.reason


LEASE_LOST = (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
TASK_FINISHED = (grpc.StatusCode.FAILED_PRECONDITION, "TASK_FINISHED")
TASK_CANCELLED = (grpc.StatusCode.FAILED_PRECONDITION, "TASK_CANCELLED")


def test_lease_complete_and_wait_round_trip(client: Client) -> None:
    action = new_action()
    created = client.create_task(new_agent(), action, {"to": "ada@example.com"}).task
    assert (created.status, created.attempt, created.error_message) == ("QUEUED", 0, "")
    assert not created.finished
    waited: list[Task] = []
    waiter = threading.Thread(target=lambda: waited.append(client.wait_task(created.task_id, timeout=60)))
    waiter.start()

    before = datetime.now(timezone.utc)
    lease = lease_one(client, action, lease_duration=30)
    after = datetime.now(timezone.utc)

    assert uuid.UUID(lease.lease_token)
    assert lease.task.task_id == created.task_id
    assert (lease.task.status, lease.task.attempt) == ("RUNNING", 1)
    assert lease.task.parameters == {"to": "ada@example.com"}
    # 30 s from when the server granted it, somewhere between before and
    # after (however long the call took); the tolerance is for rounding.
    rounding = timedelta(milliseconds=10)
    assert before + timedelta(seconds=30) - rounding <= lease.expire_time <= after + timedelta(seconds=30) + rounding
    assert lease.expire_time.tzinfo is timezone.utc

    renewed = client.renew_lease(lease, lease_duration=60)
    assert renewed.lease_token == lease.lease_token
    assert renewed.expire_time > lease.expire_time

    done = client.complete_task(renewed, {"message_id": "m-1", "n": 2})
    assert (done.status, done.result, done.attempt) == ("SUCCEEDED", {"message_id": "m-1", "n": 2.0}, 1)
    assert done.finished
    assert done.update_time is not None and done.update_time >= done.create_time

    waiter.join(timeout=60)
    assert waited == [done]
    assert client.get_task(created.task_id) == done
    # A finished task is returned at once, not after the timeout.
    began = time.monotonic()
    assert client.wait_task(created.task_id, timeout=60) == done
    assert time.monotonic() - began < 30


def test_a_stale_token_is_refused_with_lease_lost(client: Client) -> None:
    action = new_action()
    client.create_task(new_agent(), action)
    first = lease_one(client, action, lease_duration=1)
    # Nobody renews it: once the lease runs out, another worker gets the
    # task (this long poll returns then).
    second = lease_one(client, action)
    assert second.task.attempt == 2
    assert second.lease_token != first.lease_token

    for call in (
        lambda: client.renew_lease(first),
        lambda: client.complete_task(first, {"by": "first"}),
        lambda: client.fail_task(first, "late"),
        lambda: client.complete_task(dataclasses.replace(second, lease_token=str(uuid.uuid4()))),
    ):
        with pytest.raises(Rejected) as refused:
            call()
        assert refusal(refused) == LEASE_LOST
        assert refused.value.attempts == 1

    # The stale calls changed nothing: the current lease still completes.
    assert client.complete_task(second, {"by": "second"}).result == {"by": "second"}


def test_bad_ids_and_tokens_are_invalid_and_unknown_tasks_not_found(client: Client) -> None:
    action = new_action()
    client.create_task(new_agent(), action)
    lease = lease_one(client, action)

    with pytest.raises(Rejected) as refused:
        client.complete_task(dataclasses.replace(lease, lease_token="not-a-token"))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in refused.value.field_violations] == ["lease_token"]

    unknown = dataclasses.replace(lease, task=dataclasses.replace(lease.task, task_id=str(uuid.uuid4())))
    with pytest.raises(Rejected) as refused:
        client.renew_lease(unknown)
    assert refused.value.code == grpc.StatusCode.NOT_FOUND

    with pytest.raises(Rejected) as refused:
        client.lease_tasks("", [action])
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in refused.value.field_violations] == ["worker_id"]


def test_completion_repeated_with_the_same_token_returns_the_same_task(client: Client) -> None:
    action = new_action()
    client.create_task(new_agent(), action)
    lease = lease_one(client, action)

    first = client.complete_task(lease, {"ok": True})
    again = client.complete_task(lease, {"ok": True})

    assert again == first
    assert again.update_time == first.update_time
    with pytest.raises(Rejected) as refused:
        client.fail_task(lease, "too late")
    assert refusal(refused) == TASK_FINISHED
    with pytest.raises(Rejected) as refused:
        client.renew_lease(lease)
    assert refusal(refused) == TASK_FINISHED


def test_a_retryable_failure_queues_the_task_for_attempt_two(client: Client) -> None:
    action = new_action()
    created = client.create_task(new_agent(), action).task
    lease = lease_one(client, action)

    failed = client.fail_task(lease, "mail server busy", retry_after=0)

    assert (failed.status, failed.error_message, failed.attempt) == ("QUEUED", "mail server busy", 1)
    again = lease_one(client, action)
    assert again.task.task_id == created.task_id
    assert (again.task.status, again.task.attempt) == ("RUNNING", 2)
    assert again.lease_token != lease.lease_token
    assert client.complete_task(again).status == "SUCCEEDED"


def test_retry_after_holds_the_task_back(client: Client) -> None:
    action = new_action()
    client.create_task(new_agent(), action)
    lease = lease_one(client, action)

    held = 3.0

    began = time.monotonic()
    client.fail_task(lease, "later", retry_after=held)
    early = client.lease_tasks("w", [action])
    if time.monotonic() - began < held:
        # Asked within the hold, which started after `began`: nothing yet.
        # (Only a machine stalled for the whole hold skips this.)
        assert early == []
    [again] = early or [lease_one(client, action)]

    # Leased once the hold was over; the tolerance is for the clocks'
    # rounding (slowness only adds to the time).
    assert time.monotonic() - began >= held - 0.1
    assert again.task.attempt == 2


def test_a_permanent_failure_ends_the_task_failed(client: Client) -> None:
    action = new_action()
    created = client.create_task(new_agent(), action).task
    lease = lease_one(client, action)

    failed = client.fail_task(lease, "no such mailbox", permanent=True)

    assert (failed.status, failed.error_message, failed.result) == ("FAILED", "no such mailbox", None)
    assert failed.finished
    assert client.wait_task(created.task_id, timeout=5) == failed
    assert client.lease_tasks("w", [action]) == []


def test_the_last_allowed_attempt_ends_the_task_failed(client: Client) -> None:
    action = new_action()
    client.create_task(new_agent(), action)
    statuses = []
    for attempt in range(1, 6):
        lease = lease_one(client, action)
        assert lease.task.attempt == attempt
        statuses.append(client.fail_task(lease, f"failure {attempt}", retry_after=0))

    assert [task.status for task in statuses] == ["QUEUED"] * 4 + ["FAILED"]
    assert statuses[-1].error_message == "failure 5"
    assert client.lease_tasks("w", [action]) == []


def test_cancel_a_queued_task(client: Client) -> None:
    action = new_action()
    created = client.create_task(new_agent(), action).task

    cancelled = client.cancel_task(created.task_id)

    assert (cancelled.task_id, cancelled.status) == (created.task_id, "CANCELLED")
    assert cancelled.finished
    assert client.cancel_task(created.task_id) == cancelled
    assert client.wait_task(created.task_id, timeout=5) == cancelled
    assert client.lease_tasks("w", [action]) == []


def test_cancel_a_running_task_stops_its_lease(client: Client) -> None:
    action = new_action()
    client.create_task(new_agent(), action)
    lease = lease_one(client, action)

    assert client.cancel_task(lease.task.task_id).status == "CANCELLED"

    with pytest.raises(Rejected) as refused:
        client.renew_lease(lease)
    assert refusal(refused) == TASK_CANCELLED
    with pytest.raises(Rejected) as refused:
        client.complete_task(lease, {"ok": True})
    assert refusal(refused) == TASK_CANCELLED


def test_cancel_a_finished_task_leaves_it_unchanged(client: Client) -> None:
    action = new_action()
    client.create_task(new_agent(), action)
    done = client.complete_task(lease_one(client, action), {"ok": True})

    assert client.cancel_task(done.task_id) == done


def test_cancel_and_wait_of_unknown_tasks_are_not_found(client: Client) -> None:
    for call in (client.cancel_task, client.wait_task):
        with pytest.raises(Rejected) as refused:
            call(str(uuid.uuid4()))
        assert refused.value.code == grpc.StatusCode.NOT_FOUND


def test_wait_task_times_out_with_the_task_still_queued(client: Client) -> None:
    created = client.create_task(new_agent(), new_action()).task

    began = time.monotonic()
    waited = client.wait_task(created.task_id, timeout=1.0)
    elapsed = time.monotonic() - began

    assert waited.status == "QUEUED"
    assert not waited.finished
    # At least the timeout (less the clocks' rounding), and it ended then:
    # far sooner than the default 30 s.
    assert 0.9 <= elapsed < 20
    began = time.monotonic()
    assert client.wait_task(created.task_id, timeout=0).status == "QUEUED"
    assert time.monotonic() - began < 20


def test_wait_task_longer_than_one_server_wait_makes_several_calls(
    server: Server, counted_channel: CountedChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oncely._client, "MAX_SERVER_WAIT", 0.5)
    channel, counter = counted_channel(server.address)
    client = Client(channel=channel)
    created = client.create_task(new_agent(), new_action()).task

    began = time.monotonic()
    waited = client.wait_task(created.task_id, timeout=1.8)
    elapsed = time.monotonic() - began

    assert waited.status == "QUEUED"
    # However slowly the calls went: each asked the server for at most
    # 0.5 s, together never past the timeout, and they went on until the
    # whole timeout had passed. (How many there were is not asserted: on a
    # stalled machine one call alone may outlast the timeout.)
    asked = [call.request.timeout.ToNanoseconds() / 1e9 for call in counter.calls("WaitTask")]
    assert asked and all(0 <= wait <= 0.5 for wait in asked), asked
    assert sum(asked) <= 1.8, asked
    assert 1.7 <= elapsed < 20


def test_wait_task_returns_when_the_task_finishes_within_the_timeout(client: Client) -> None:
    action = new_action()
    created = client.create_task(new_agent(), action).task
    lease = lease_one(client, action)
    began = time.monotonic()
    threading.Timer(1.0, client.fail_task, args=(lease, "broken"), kwargs={"permanent": True}).start()

    waited = client.wait_task(created.task_id, timeout=60)

    assert (waited.status, waited.error_message) == ("FAILED", "broken")
    # It waited for the failure (at least a second after `began`), and
    # returned with it, far sooner than the timeout.
    assert 0.9 <= time.monotonic() - began < 30


def test_wait_task_retries_a_server_that_comes_back(start_server: StartServer, counted_channel: CountedChannel) -> None:
    port = free_port()
    # Quick, and patient enough to outlast a server starting on a busy machine.
    patient = RetryPolicy(max_attempts=100_000, initial_backoff=0.05, max_backoff=0.2)
    channel, counter = counted_channel(f"127.0.0.1:{port}", options=channel_options(patient))
    with Client(channel=channel, retry_policy=patient) as client:
        results: list[Any] = []

        def wait() -> None:
            try:
                results.append(client.wait_task(str(uuid.uuid4()), timeout=120))
            except Exception as error:  # noqa: BLE001 - the test looks at it
                results.append(error)

        waiter = threading.Thread(target=wait)
        waiter.start()
        # Attempts fail while nothing listens: a second one was sent.
        eventually(lambda: counter.count("WaitTask") >= 2 or results, "a second attempt")
        assert results == []
        start_server(port=port)  # waits while another process holds the port
        waiter.join(timeout=180)

    # The server came back and answered: the id is unknown there.
    assert len(results) == 1
    assert isinstance(results[0], Rejected) and results[0].code == grpc.StatusCode.NOT_FOUND


def test_lease_tasks_long_polls_until_a_task_arrives(client: Client) -> None:
    action = new_action()
    agent = new_agent()
    began = time.monotonic()
    threading.Timer(1.0, client.create_task, args=(agent, action)).start()

    leases = client.lease_tasks("w", [action], wait=60)

    # It waited for the task (created at least a second after `began`), and
    # returned with it, far sooner than its wait.
    assert len(leases) == 1
    assert 0.9 <= time.monotonic() - began < 30
    began = time.monotonic()
    assert client.lease_tasks("w", [action], wait=1) == []
    assert time.monotonic() - began >= 0.9


def test_lease_tasks_takes_up_to_max_tasks_oldest_first(client: Client) -> None:
    action = new_action()
    agent = new_agent()
    ids = [client.create_task(agent, action, {"n": n}).task.task_id for n in range(5)]

    first = client.lease_tasks("w", [action], max_tasks=3)
    rest = client.lease_tasks("w", [action], max_tasks=3)

    assert [lease.task.task_id for lease in first] == ids[:3]
    assert [lease.task.task_id for lease in rest] == ids[3:]
    assert len({lease.lease_token for lease in first + rest}) == 5


# The Worker helper.


class SideEffects:
    """Counts what handlers did, by task id, across threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count: Counter[str] = Counter()

    def record(self, task: Task) -> None:
        with self.lock:
            self.count[task.task_id] += 1


def run_workers(workers: list[Worker]) -> tuple[threading.Event, list[threading.Thread], list[BaseException]]:
    """Runs each worker in a thread of its own; returns the stop event, the
    threads and a list that collects what ``run`` raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(worker: Worker) -> None:
        try:
            worker.run(stop)
        except BaseException as error:  # noqa: BLE001 - the test looks at it
            errors.append(error)

    threads = [threading.Thread(target=run, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    return stop, threads, errors


def stop_workers(stop: threading.Event, threads: list[threading.Thread]) -> None:
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a worker did not stop"


def test_two_workers_perform_each_task_exactly_once(client: Client) -> None:
    action = new_action()
    agent = new_agent()
    effects = SideEffects()

    def handler(task: Task) -> dict[str, Any]:
        effects.record(task)
        time.sleep(0.05)
        return {"doubled": task.parameters["n"] * 2}

    # Leases far longer than a handler takes, so that none runs out however
    # late a heartbeat is: every task is performed at its first attempt.
    workers = [
        Worker(client, f"worker-{n}", [action], handler, concurrency=2, lease_duration=60, poll_wait=1)
        for n in range(2)
    ]
    stop, threads, errors = run_workers(workers)
    try:
        ids = [client.create_task(agent, action, {"n": n}).task.task_id for n in range(30)]
        finished = [client.wait_task(task_id, timeout=60) for task_id in ids]
    finally:
        stop_workers(stop, threads)

    assert errors == []
    assert [task.status for task in finished] == ["SUCCEEDED"] * 30
    assert [task.result for task in finished] == [{"doubled": 2.0 * n} for n in range(30)]
    assert [task.attempt for task in finished] == [1] * 30
    assert effects.count == Counter(ids)


def test_the_worker_heartbeat_keeps_a_long_task_from_going_to_another_worker(
    client: Client, server: Server, counted_channel: CountedChannel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="oncely.worker")
    action = new_action()
    effects = SideEffects()
    # Renewed every 5/3 s: a heartbeat may come more than 3 s late, and the
    # lease still holds.
    lease_duration = 5.0
    counters: list[AttemptCounter] = []
    clients: list[Client] = []
    for _ in range(2):
        channel, counter = counted_channel(server.address)
        counters.append(counter)
        clients.append(Client(channel=channel))
    outlived: list[bool] = []

    def slow(mine: int) -> Handler:
        other = counters[1 - mine]

        def handle(task: Task) -> dict[str, Any]:
            effects.record(task)
            # The lease was granted before this started: unless renewed, it
            # has run out by `expired`. Work on until the other worker has
            # asked for tasks since then (a LeaseTasks call it started
            # later has ended): that call would have got this task, had the
            # heartbeat not kept the lease.
            expired = time.monotonic() + lease_duration
            outlived.append(
                wait_until(
                    lambda: any(
                        call.start > expired and call.code == grpc.StatusCode.OK for call in other.calls("LeaseTasks")
                    ),
                    timeout=lease_duration + PATIENCE,
                )
            )
            return {"slow": True}

        return handle

    workers = [
        Worker(clients[n], f"worker-{n}", [action], slow(n), lease_duration=lease_duration, poll_wait=1)
        for n in range(2)
    ]
    stop, threads, errors = run_workers(workers)
    try:
        created = client.create_task(new_agent(), action).task
        done = client.wait_task(created.task_id, timeout=lease_duration + 2 * PATIENCE)
    finally:
        stop_workers(stop, threads)

    assert errors == []
    assert outlived == [True], "the other worker did not ask for tasks after the lease would have run out"
    assert (done.status, done.attempt, done.result) == ("SUCCEEDED", 1, {"slow": True})
    assert effects.count == Counter({created.task_id: 1})
    # The heartbeat renewed the lease, and was never told it was lost.
    renewals = [call.code for counter in counters for call in counter.calls("RenewLease")]
    assert grpc.StatusCode.OK in renewals, renewals
    assert grpc.StatusCode.FAILED_PRECONDITION not in renewals, renewals
    assert [r.getMessage() for r in caplog.records if "the lease is gone" in r.getMessage()] == []


def test_the_worker_fails_tasks_whose_handler_raises(client: Client) -> None:
    action = new_action()
    effects = SideEffects()

    def handler(task: Task) -> dict[str, Any]:
        effects.record(task)
        if task.parameters["kind"] == "permanent":
            raise PermanentError("no such mailbox")
        if task.attempt == 1:
            raise ConnectionError("mail server busy")
        return {"attempt": task.attempt}

    worker = Worker(client, "worker", [action], handler, poll_wait=1)
    stop, threads, errors = run_workers([worker])
    try:
        agent = new_agent()
        permanent = client.create_task(agent, action, {"kind": "permanent"}).task
        flaky = client.create_task(agent, action, {"kind": "flaky"}).task
        permanent = client.wait_task(permanent.task_id, timeout=30)
        flaky = client.wait_task(flaky.task_id, timeout=50)
    finally:
        stop_workers(stop, threads)

    assert errors == []
    assert (permanent.status, permanent.error_message, permanent.attempt) == (
        "FAILED",
        "PermanentError: no such mailbox",
        1,
    )
    assert (flaky.status, flaky.result, flaky.attempt) == ("SUCCEEDED", {"attempt": 2.0}, 2)
    assert effects.count == Counter({permanent.task_id: 1, flaky.task_id: 2})


def test_the_worker_drops_the_outcome_of_a_task_cancelled_while_it_runs(
    client: Client, server: Server, counted_channel: CountedChannel
) -> None:
    action = new_action()
    channel, counter = counted_channel(server.address)
    started = threading.Event()
    cancelled = threading.Event()
    heard: list[bool] = []
    returned: list[float] = []

    def handler(task: Task) -> dict[str, Any]:
        started.set()
        # Runs until the heartbeat has heard of the cancel: a renewal sent
        # after it was refused (FAILED_PRECONDITION, TASK_CANCELLED).
        cancelled.wait(timeout=PATIENCE)
        after = time.monotonic()
        heard.append(
            wait_until(
                lambda: any(
                    call.start > after and call.code == grpc.StatusCode.FAILED_PRECONDITION
                    for call in counter.calls("RenewLease")
                )
            )
        )
        returned.append(time.monotonic())
        return {"ok": True}

    # Renewed every second; how late does not matter here.
    worker = Worker(Client(channel=channel), "worker", [action], handler, lease_duration=3, poll_wait=1)
    stop, threads, errors = run_workers([worker])
    try:
        created = client.create_task(new_agent(), action).task
        assert started.wait(timeout=PATIENCE)
        client.cancel_task(created.task_id)
        cancelled.set()
        # The handler returns; the worker is done with the task once it
        # asks for the next one.
        eventually(
            lambda: returned and any(call.start > returned[0] for call in counter.calls("LeaseTasks")),
            "the worker to ask for another task",
            timeout=2 * PATIENCE,
        )
    finally:
        stop_workers(stop, threads)

    assert errors == []
    assert heard == [True]
    assert (counter.count("CompleteTask"), counter.count("FailTask")) == (0, 0)
    after = client.get_task(created.task_id)
    assert (after.status, after.result) == ("CANCELLED", None)


def test_a_worker_whose_lease_calls_are_refused_stops_with_the_error(client: Client) -> None:
    worker = Worker(client, "", [new_action()], lambda task: None, concurrency=2, poll_wait=1)

    with pytest.raises(Rejected) as refused:
        worker.run(threading.Event())

    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_stopped_worker_finishes_the_task_in_hand(client: Client) -> None:
    action = new_action()
    started = threading.Event()
    stopping = threading.Event()

    def handler(task: Task) -> dict[str, Any]:
        started.set()
        stopping.wait(timeout=PATIENCE)  # the stop comes while this runs
        return {"finished": True}

    worker = Worker(client, "worker", [action], handler, poll_wait=1)
    stop, threads, errors = run_workers([worker])
    created = client.create_task(new_agent(), action).task
    assert started.wait(timeout=PATIENCE)
    stop.set()
    stopping.set()
    stop_workers(stop, threads)
    second = client.create_task(new_agent(), action).task

    assert errors == []
    assert client.get_task(created.task_id).result == {"finished": True}
    assert client.get_task(second.task_id).status == "QUEUED"
