"""Unit tests of the worker side that need no server: durations, the new
Task fields, leases, and the Worker's decisions (driven by a stand-in
client that records the calls)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, cast

import grpc
import pytest
from conftest import PATIENCE, eventually, wait_until
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

import oncely
from oncely import FINISHED_STATUSES, Client, GaveUp, Handler, Lease, PermanentError, Rejected, Task, Worker
from oncely._client import to_duration, to_struct
from oncely._proto.tasks.v1 import tasks_pb2, worker_pb2
from oncely._worker import failure_message, heartbeat_interval, is_lost

TASK_ID = "6f1c9f3e-2d8a-4a57-9f5e-0c1d2e3f4a5b"
TOKEN = "0b6c1f0e-8f8e-4c55-9a77-3f4f5e6d7c8b"


def task_message(**fields: Any) -> tasks_pb2.Task:
    message = tasks_pb2.Task(task_id=TASK_ID, agent_id="agent-7", action="send_email", **fields)
    message.create_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    return message


def a_lease(parameters: Mapping[str, Any] | None = None) -> Lease:
    message = worker_pb2.Lease(task=task_message(status=tasks_pb2.TASK_STATUS_RUNNING, attempt=1))
    message.task.parameters.update(parameters or {})
    message.lease_token = TOKEN
    message.expire_time.FromDatetime(datetime(2026, 1, 2, 3, 5, 5, tzinfo=timezone.utc))
    return Lease.from_proto(message)


def refused(reason: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> Rejected:
    detail = status_pb2.Status(code=code.value[0], message=reason)
    detail.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="oncely"))
    return Rejected(code, reason.lower(), status=detail)


def test_durations_are_exact_to_the_nanosecond() -> None:
    assert to_duration(0, "wait").ToNanoseconds() == 0
    assert to_duration(1.5, "wait").ToNanoseconds() == 1_500_000_000
    assert to_duration(30, "wait").seconds == 30
    assert to_duration(0.000000001, "wait").nanos == 1
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lease_duration"):
            to_duration(bad, "lease_duration")


def test_results_must_be_json_like_mappings() -> None:
    assert to_struct(None, "result") == to_struct({}, "result")
    assert json_format.MessageToDict(to_struct({"n": 2, "l": [1, None]}, "result")) == {"n": 2.0, "l": [1.0, None]}
    with pytest.raises(TypeError, match="result must be a mapping"):
        to_struct(["a"], "result")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="JSON-like"):
        to_struct({1: "a"}, "result")  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="JSON-like"):
        to_struct({"when": datetime(2026, 1, 1)}, "result")


def test_a_task_carries_attempt_update_time_and_error_message() -> None:
    message = task_message(status=tasks_pb2.TASK_STATUS_FAILED, attempt=3, error_message="no such mailbox")
    message.update_time.FromDatetime(datetime(2026, 1, 2, 3, 9, 0, tzinfo=timezone.utc))

    task = Task.from_proto(message)

    assert (task.status, task.attempt, task.error_message) == ("FAILED", 3, "no such mailbox")
    assert task.update_time == datetime(2026, 1, 2, 3, 9, 0, tzinfo=timezone.utc)
    assert task.update_time.tzinfo is timezone.utc
    assert task.finished


def test_a_task_without_update_time_has_none() -> None:
    task = Task.from_proto(task_message())
    assert (task.attempt, task.update_time, task.error_message) == (0, None, "")


@pytest.mark.parametrize(
    ("status", "name", "finished"),
    [
        (tasks_pb2.TASK_STATUS_UNSPECIFIED, "UNSPECIFIED", False),
        (tasks_pb2.TASK_STATUS_QUEUED, "QUEUED", False),
        (tasks_pb2.TASK_STATUS_RUNNING, "RUNNING", False),
        (tasks_pb2.TASK_STATUS_SUCCEEDED, "SUCCEEDED", True),
        (tasks_pb2.TASK_STATUS_FAILED, "FAILED", True),
        (tasks_pb2.TASK_STATUS_CANCELLED, "CANCELLED", True),
    ],
)
def test_finished_means_succeeded_failed_or_cancelled(status: int, name: str, finished: bool) -> None:
    task = Task.from_proto(task_message(status=status))
    assert task.status == name
    assert task.finished is finished
    assert (name in FINISHED_STATUSES) is finished


def test_a_lease_is_built_from_its_message() -> None:
    lease = a_lease()

    assert lease.task.task_id == TASK_ID
    assert (lease.task.status, lease.task.attempt) == ("RUNNING", 1)
    assert lease.lease_token == TOKEN
    assert lease.expire_time == datetime(2026, 1, 2, 3, 5, 5, tzinfo=timezone.utc)
    assert lease.proto.lease_token == TOKEN
    assert lease == a_lease()
    with pytest.raises(dataclasses.FrozenInstanceError):
        lease.lease_token = "other"  # type: ignore[misc]


def test_failure_messages_name_the_error_type() -> None:
    assert failure_message(ValueError("bad address")) == "ValueError: bad address"
    assert failure_message(PermanentError("no such mailbox")) == "PermanentError: no such mailbox"
    assert failure_message(TimeoutError()) == "TimeoutError"


def test_the_heartbeat_renews_every_third_of_the_lease() -> None:
    assert heartbeat_interval(30) == 10
    assert heartbeat_interval(1) == pytest.approx(1 / 3)


def test_a_lease_is_lost_only_for_the_lost_reasons() -> None:
    for reason in ("LEASE_LOST", "TASK_CANCELLED", "TASK_FINISHED"):
        assert is_lost(refused(reason))
    assert not is_lost(refused("IDEMPOTENCY_KEY_REUSED"))
    assert not is_lost(refused("LEASE_LOST", grpc.StatusCode.INVALID_ARGUMENT))
    assert not is_lost(GaveUp(grpc.StatusCode.UNAVAILABLE, "down"))


@pytest.mark.parametrize(
    "options",
    [{"concurrency": 0}, {"lease_duration": 0.5}, {"lease_duration": 3601}, {"poll_wait": -1}, {"poll_wait": 61}],
)
def test_a_worker_that_cannot_work_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Worker(cast(Client, None), "w", ["a"], lambda task: None, **options)


def test_the_exports() -> None:
    for name in ("Lease", "Worker", "PermanentError", "FINISHED_STATUSES", "Handler"):
        assert name in oncely.__all__
        assert hasattr(oncely, name)


class StandInClient:
    """Hands out the given leases once, then none, and records the worker's
    calls; ``renew_error`` is raised by every renewal."""

    def __init__(self, leases: list[Lease], renew_error: Exception | None = None) -> None:
        self.leases = list(leases)
        self.renew_error = renew_error
        self.calls: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()
        self.lease_calls: list[dict[str, Any]] = []
        self.renew_timeouts: list[float | None] = []
        self.renew_times: list[float] = []

    def lease_tasks(self, worker_id: str, actions: Iterable[str] = (), **options: Any) -> list[Lease]:
        with self.lock:
            self.lease_calls.append({"worker_id": worker_id, "actions": tuple(actions), **options})
            if self.leases:
                return [self.leases.pop(0)]
        time.sleep(0.01)
        return []

    def renew_lease(self, lease: Lease, lease_duration: float | None = None, *, timeout: float | None = None) -> Lease:
        with self.lock:
            self.calls.append(("renew", lease.task.task_id, lease_duration))
            self.renew_timeouts.append(timeout)
            self.renew_times.append(time.monotonic())
        if self.renew_error is not None:
            raise self.renew_error
        return lease

    def renewals(self) -> int:
        """How many renewals were asked for so far."""
        with self.lock:
            return len(self.renew_times)

    def complete_task(self, lease: Lease, result: Mapping[str, Any] | None = None) -> Task:
        to_struct(result, "result")  # what the real client does first
        with self.lock:
            self.calls.append(("complete", lease.task.task_id, result))
        return lease.task

    def fail_task(
        self, lease: Lease, message: str, *, permanent: bool = False, retry_after: float | None = None
    ) -> Task:
        with self.lock:
            self.calls.append(("fail", lease.task.task_id, message, permanent))
        return lease.task


def run_until_idle(client: StandInClient, handler: Any, **options: Any) -> None:
    """Runs a Worker on the stand-in until it has no lease left to hand out
    and every handler has returned."""
    stop = threading.Event()
    worker = Worker(cast(Client, client), "w-1", ["send_email"], handler, **options)
    runner = threading.Thread(target=worker.run, args=(stop,))
    runner.start()

    def idle() -> bool:
        with client.lock:
            return not client.leases and len(client.lease_calls) > 3

    try:
        # Longer than a handler of working_until waits.
        eventually(idle, "the worker to lease all it was given and ask again", timeout=2 * PATIENCE)
    finally:
        stop.set()
        runner.join(timeout=PATIENCE)
    assert not runner.is_alive()


def working_until(condition: Callable[[], Any]) -> Handler:
    """A handler that works (waits) until ``condition()`` holds, at most
    30 s, and returns no result."""

    def handle(task: Task) -> None:
        wait_until(condition)

    return handle


def outcomes(client: StandInClient) -> list[tuple[Any, ...]]:
    return [call for call in client.calls if call[0] != "renew"]


def test_the_worker_completes_with_what_the_handler_returns() -> None:
    client = StandInClient([a_lease()])
    seen: list[Task] = []

    run_until_idle(client, lambda task: seen.append(task) or {"sent": True})

    assert [task.task_id for task in seen] == [TASK_ID]
    assert outcomes(client) == [("complete", TASK_ID, {"sent": True})]
    assert client.lease_calls[0] == {
        "worker_id": "w-1",
        "actions": ("send_email",),
        "max_tasks": 1,
        "lease_duration": 30.0,
        "wait": 20.0,
    }


def test_the_worker_fails_permanently_on_permanent_error_and_retryably_otherwise() -> None:
    def handler(task: Task) -> None:
        if task.parameters.get("permanent"):
            raise PermanentError("no such mailbox")
        raise ConnectionError("busy")

    client = StandInClient([a_lease({"permanent": True}), a_lease()])

    run_until_idle(client, handler)

    assert outcomes(client) == [
        ("fail", TASK_ID, "PermanentError: no such mailbox", True),
        ("fail", TASK_ID, "ConnectionError: busy", False),
    ]


def test_the_worker_renews_while_the_handler_runs() -> None:
    client = StandInClient([a_lease()])

    # The handler runs until the heartbeat has renewed three times.
    run_until_idle(client, working_until(lambda: client.renewals() >= 3), lease_duration=1)

    renewals = [call for call in client.calls if call[0] == "renew"]
    assert len(renewals) >= 3
    assert all(call == ("renew", TASK_ID, 1.0) for call in renewals)
    # Every third of the lease, never sooner (however late the threads
    # ran); the tolerance is for the clock's rounding.
    interval = heartbeat_interval(1.0)
    gaps = [later - earlier for earlier, later in zip(client.renew_times, client.renew_times[1:])]
    assert all(gap >= interval - 0.01 for gap in gaps), gaps
    # Each renewal retries only until the next beat, never past the lease.
    assert all(timeout == interval for timeout in client.renew_timeouts)
    assert outcomes(client) == [("complete", TASK_ID, None)]


@pytest.mark.parametrize("reason", ["LEASE_LOST", "TASK_CANCELLED", "TASK_FINISHED"])
def test_the_worker_drops_the_outcome_of_a_lost_lease(reason: str) -> None:
    client = StandInClient([a_lease()], renew_error=refused(reason))

    # The handler runs until the heartbeat has been told the lease is lost.
    run_until_idle(client, working_until(lambda: client.renewals() >= 1), lease_duration=1)

    assert client.renewals() == 1  # the heartbeat stopped then
    assert outcomes(client) == []


def test_the_worker_keeps_the_lease_through_transient_renewal_failures() -> None:
    client = StandInClient([a_lease()], renew_error=GaveUp(grpc.StatusCode.UNAVAILABLE, "down"))

    # The handler runs until two renewals in a row have failed.
    run_until_idle(client, working_until(lambda: client.renewals() >= 2), lease_duration=1)

    assert [call[0] for call in client.calls].count("renew") >= 2
    assert outcomes(client) == [("complete", TASK_ID, None)]


def test_a_result_that_is_not_a_mapping_fails_the_task_for_good() -> None:
    client = StandInClient([a_lease()])

    run_until_idle(client, lambda task: ["not", "a", "mapping"])

    [(call, task_id, message, permanent)] = outcomes(client)
    assert (call, task_id, permanent) == ("fail", TASK_ID, True)
    assert message.startswith("the handler's result cannot be sent: ")


def test_a_bug_in_one_task_does_not_stop_the_worker() -> None:
    client = StandInClient([a_lease(), a_lease()])
    original = client.fail_task
    calls = []

    def broken_fail_task(*args: Any, **kwargs: Any) -> Task:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return original(*args, **kwargs)

    client.fail_task = broken_fail_task  # type: ignore[method-assign]

    run_until_idle(client, lambda task: 1 / 0)

    assert len(calls) == 2
    assert outcomes(client) == [("fail", TASK_ID, "ZeroDivisionError: division by zero", False)]
