"""The values the client returns: plain, immutable Python objects built from
the protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from google.protobuf import json_format

from ._proto.tasks.v1 import tasks_pb2, worker_pb2

_STATUS_PREFIX = "TASK_STATUS_"

FINISHED_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
"""The statuses a task never leaves: :attr:`Task.finished` is true for
these."""


def _status_name(value: int) -> str:
    """``"QUEUED"`` for ``TASK_STATUS_QUEUED``; the number, as text, for a
    status newer than these stubs."""
    try:
        return tasks_pb2.TaskStatus.Name(value).removeprefix(_STATUS_PREFIX)
    except ValueError:
        return str(value)


@dataclass(frozen=True)
class Task:
    """A task, as the server stores it.

    Numbers in :attr:`parameters` and :attr:`result` come back as ``float``
    (they travel as ``google.protobuf.Struct``, whose numbers are doubles, as
    in JSON). Fields the server sends that this class does not carry yet are
    on the message in :attr:`proto`.
    """

    task_id: str
    """The task's id, a UUID."""
    agent_id: str
    """The agent the task belongs to."""
    action: str
    """What the task does."""
    parameters: dict[str, Any] = field(hash=False)
    """The action's arguments (empty if none were given)."""
    status: str
    """``"QUEUED"``, ``"RUNNING"``, ``"SUCCEEDED"``, ``"FAILED"``,
    ``"CANCELLED"`` or ``"UNSPECIFIED"``: the ``TaskStatus`` name without
    ``TASK_STATUS_``."""
    create_time: datetime
    """When the task was created (timezone-aware, UTC)."""
    result: dict[str, Any] | None = field(hash=False)
    """What the task produced; None until something completes it."""
    attempt: int
    """How many times the task has been leased to a worker (0 while it
    waits for its first lease)."""
    update_time: datetime | None
    """When the task last changed (timezone-aware, UTC); None from a server
    that does not send it."""
    error_message: str
    """Why the last attempt failed, or why the task ended ``FAILED``; empty
    otherwise."""
    proto: tasks_pb2.Task = field(repr=False, compare=False)
    """The protobuf message this was built from."""

    @property
    def finished(self) -> bool:
        """True once the task is ``SUCCEEDED``, ``FAILED`` or ``CANCELLED``:
        it will not change again."""
        return self.status in FINISHED_STATUSES

    @classmethod
    def from_proto(cls, message: tasks_pb2.Task) -> Task:
        """Builds a :class:`Task` from its protobuf message."""
        return cls(
            task_id=message.task_id,
            agent_id=message.agent_id,
            action=message.action,
            parameters=json_format.MessageToDict(message.parameters),
            status=_status_name(message.status),
            create_time=message.create_time.ToDatetime(tzinfo=timezone.utc),
            result=json_format.MessageToDict(message.result) if message.HasField("result") else None,
            attempt=message.attempt,
            update_time=message.update_time.ToDatetime(tzinfo=timezone.utc)
            if message.HasField("update_time")
            else None,
            error_message=message.error_message,
            proto=message,
        )


@dataclass(frozen=True)
class Lease:
    """A task leased to a worker: until :attr:`expire_time` no other worker
    gets it. Pass the lease to :meth:`~oncely.Client.renew_lease` (the
    heartbeat), then to :meth:`~oncely.Client.complete_task` or
    :meth:`~oncely.Client.fail_task`."""

    task: Task
    """The task, as it was when leased or last renewed: ``RUNNING``, with
    its :attr:`~Task.attempt` number."""
    lease_token: str
    """The token every later call about this lease shows."""
    expire_time: datetime
    """When the lease runs out unless renewed (timezone-aware, UTC); after
    that another worker may lease the task."""
    proto: worker_pb2.Lease = field(repr=False, compare=False)
    """The protobuf message this was built from."""

    @classmethod
    def from_proto(cls, message: worker_pb2.Lease) -> Lease:
        """Builds a :class:`Lease` from its protobuf message."""
        return cls(
            task=Task.from_proto(message.task),
            lease_token=message.lease_token,
            expire_time=message.expire_time.ToDatetime(tzinfo=timezone.utc),
            proto=message,
        )


@dataclass(frozen=True)
class TaskPage:
    """One page of an agent's tasks, oldest first."""

    tasks: tuple[Task, ...]
    """The tasks of this page."""
    next_page_token: str
    """Pass this as ``page_token`` to get the next page; empty on the last
    page."""


@dataclass(frozen=True)
class Created:
    """The answer to :meth:`~oncely.Client.create_task`."""

    task: Task
    """The task, created by this call or by an earlier one with its key."""
    replayed: bool
    """True when the answer is the stored response to an earlier attempt or
    call with the same key (response metadata ``idempotent-replayed:
    true``): the task was created once, earlier."""
    key: str
    """The idempotency key that was sent; pass it again to repeat this
    logical call."""
    attempts: int
    """How many attempts this call took."""
