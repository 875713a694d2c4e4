"""The client: TaskService calls with one key per logical call and safe
retries."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, cast

import grpc

from ._errors import GaveUp, Rejected, retry_delay, rpc_status
from ._models import Created, Task, TaskPage
from ._proto.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from ._retry import TRANSIENT_CODES, RetryPolicy, backoff_delay, new_idempotency_key

IDEMPOTENCY_KEY_HEADER = "idempotency-key"
REPLAYED_HEADER = "idempotent-replayed"

# The server's key rules: 1 to 255 characters of visible ASCII.
_VALID_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def channel_target(target: str) -> str:
    """The grpcio target for a server address: ``host:port``, or an
    ``http://host:port`` URL (the scheme is dropped). Raises ValueError for
    ``https://``, since the client cannot use TLS yet."""
    target = target.strip()
    if target.lower().startswith("https://"):
        raise ValueError(
            f"{target!r}: TLS is not supported by the oncely client yet;"
            " pass a plaintext address such as '127.0.0.1:50051' or 'http://127.0.0.1:50051'"
        )
    if target.lower().startswith("http://"):
        target = target[len("http://") :].rstrip("/")
    if not target:
        raise ValueError("the server address is empty")
    return target


def _channel_options(policy: RetryPolicy) -> list[tuple[str, int]]:
    """The options of the channels the client makes."""
    return [
        # Reconnect at the pace of the retries, so that a server that was
        # briefly down is reached on the next attempt.
        ("grpc.initial_reconnect_backoff_ms", max(1, int(policy.initial_backoff * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, int(policy.max_backoff * 1000))),
        # Notice a connection that went silent, rather than wait on it.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
    ]


class Client:
    """A client for oncely's TaskService that retries safely.

    ``create_task`` makes one UUID v4 idempotency key per call (or takes
    yours) and sends it on every attempt, so however often it retries the
    server creates one task. Transient failures (``UNAVAILABLE``,
    ``DEADLINE_EXCEEDED``, ``ABORTED``, ``CANCELLED``) are retried with
    exponential backoff and full jitter, never sooner than the server's
    ``RetryInfo`` asks; every other error is raised at once as
    :class:`~oncely.Rejected`. When the attempts or the time of the
    :class:`~oncely.RetryPolicy` run out, :class:`~oncely.GaveUp` is raised.
    Reads are retried the same way, since they are safe to repeat.

    Use it as a context manager, or call :meth:`close`. One client may be
    shared by threads.

    Args:
        target: The server: ``"127.0.0.1:50051"`` or
            ``"http://127.0.0.1:50051"`` (plaintext; ``https://`` raises
            ValueError, as TLS is not supported yet). The channel connects
            on first use and reconnects by itself.
        retry_policy: How hard to try; :class:`~oncely.RetryPolicy` defaults
            if None.
        channel: A channel of your own (say, with interceptors), instead of
            ``target``. The caller keeps it: :meth:`close` leaves it open.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        retry_policy: RetryPolicy | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._policy = retry_policy or RetryPolicy()
        if (target is None) == (channel is None):
            raise ValueError("give either a target address or a channel")
        self._owns_channel = channel is None
        if channel is None:
            channel = grpc.insecure_channel(channel_target(cast(str, target)), options=_channel_options(self._policy))
        self._channel = channel
        self._stub = tasks_pb2_grpc.TaskServiceStub(channel)

    @property
    def retry_policy(self) -> RetryPolicy:
        """The policy every call of this client follows."""
        return self._policy

    def close(self) -> None:
        """Closes the channel the client made (not one passed in)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def create_task(
        self,
        agent_id: str,
        action: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Created:
        """Creates a task, exactly once however often it has to retry.

        Args:
            agent_id: The agent the task belongs to (1 to 255 bytes).
            action: What the task does (1 to 255 bytes).
            parameters: The action's arguments: a JSON-like mapping.
            idempotency_key: The key of this logical call, for instance one
                stored before the agent crashed. If None, a new UUID v4 is
                made (see :func:`~oncely.new_idempotency_key`). Keys are 1 to
                255 characters of visible ASCII; ValueError otherwise.

        Returns:
            The task, whether this answer is a replay, the key and the
            number of attempts.

        Raises:
            Rejected: The server refused the request; ``FAILED_PRECONDITION``
                with reason ``IDEMPOTENCY_KEY_REUSED`` means the key was used
                for a different request.
            GaveUp: Transient failures until the policy ran out. The task may
                exist: retry later with ``error.key``.
        """
        key = new_idempotency_key() if idempotency_key is None else idempotency_key
        if not _VALID_KEY.fullmatch(key):
            raise ValueError("an idempotency key is 1 to 255 characters of visible ASCII (0x21 to 0x7E)")
        request = tasks_pb2.CreateTaskRequest(agent_id=agent_id, action=action)
        if parameters:
            request.parameters.update(parameters)
        task, call, attempts = self._call(self._stub.CreateTask, request, key=key)
        headers = dict(call.initial_metadata() or ())
        return Created(
            task=Task.from_proto(task),
            replayed=headers.get(REPLAYED_HEADER) == "true",
            key=key,
            attempts=attempts,
        )

    def get_task(self, task_id: str) -> Task:
        """Returns the task with id ``task_id``.

        Raises:
            Rejected: ``NOT_FOUND`` if there is no such task,
                ``INVALID_ARGUMENT`` if ``task_id`` is not a UUID.
            GaveUp: Transient failures until the policy ran out.
        """
        task, _, _ = self._call(self._stub.GetTask, tasks_pb2.GetTaskRequest(task_id=task_id))
        return Task.from_proto(task)

    def list_tasks(self, agent_id: str, *, page_size: int = 0, page_token: str = "") -> TaskPage:
        """Returns one page of the agent's tasks, oldest first.

        Args:
            agent_id: Whose tasks.
            page_size: How many tasks a page holds: 0 means the server's
                default (50); above 1000 means 1000.
            page_token: The previous page's ``next_page_token``; empty for
                the first page.

        Raises:
            Rejected: For instance ``INVALID_ARGUMENT`` for an empty
                ``agent_id`` or a token this server did not issue.
            GaveUp: Transient failures until the policy ran out.
        """
        request = tasks_pb2.ListTasksRequest(agent_id=agent_id, page_size=page_size, page_token=page_token)
        page, _, _ = self._call(self._stub.ListTasks, request)
        return TaskPage(
            tasks=tuple(Task.from_proto(task) for task in page.tasks),
            next_page_token=page.next_page_token,
        )

    def iter_tasks(self, agent_id: str, *, page_size: int = 0) -> Iterator[Task]:
        """Yields all the agent's tasks, oldest first, fetching page after
        page (each with its own retries) as the iteration goes on.

        Raises:
            Rejected, GaveUp: As :meth:`list_tasks`, when a page fails.
        """
        token = ""
        while True:
            page = self.list_tasks(agent_id, page_size=page_size, page_token=token)
            yield from page.tasks
            token = page.next_page_token
            if not token:
                return

    def _call(
        self,
        method: Any,
        request: Any,
        *,
        key: str | None = None,
    ) -> tuple[Any, grpc.Call, int]:
        """Calls the unary ``method`` until it succeeds, fails for good or the
        policy runs out; returns the response, the call and the number of
        attempts."""
        policy = self._policy
        metadata = ((IDEMPOTENCY_KEY_HEADER, key),) if key is not None else ()
        deadline = time.monotonic() + policy.total_timeout
        attempts = 0
        while True:
            attempts += 1
            timeout = min(policy.attempt_timeout, deadline - time.monotonic())
            try:
                response, call = method.with_call(request, metadata=metadata, timeout=timeout)
                return response, call, attempts
            except grpc.RpcError as error:
                failed = cast(grpc.Call, error)
                code, message = failed.code(), failed.details() or ""
                status = rpc_status(failed.trailing_metadata())
                if code not in TRANSIENT_CODES:
                    raise Rejected(code, message, status=status, attempts=attempts, key=key) from error
                wait = backoff_delay(policy, attempts, retry_delay(status))
                if attempts >= policy.max_attempts or time.monotonic() + wait >= deadline:
                    raise GaveUp(code, message, status=status, attempts=attempts, key=key) from error
                time.sleep(wait)
