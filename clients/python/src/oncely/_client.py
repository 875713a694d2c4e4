"""The client: TaskService calls with one key per logical call and safe
retries, and the WorkerService calls of the workers that perform tasks."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import grpc

from ._auth import auth_metadata, resolve_api_key
from ._tracing import trace_metadata
from ._errors import GaveUp, Rejected, retry_delay, retry_info_delay, rpc_status
from ._models import Created, Lease, Task, TaskPage
from ._proto.tasks.v1 import tasks_pb2, tasks_pb2_grpc, worker_pb2, worker_pb2_grpc
from ._retry import RetryPolicy, backoff_delay, is_transient, new_idempotency_key
from ._wire import VALID_KEY, channel_options, channel_target, is_secure, to_duration, to_struct

IDEMPOTENCY_KEY_HEADER = "idempotency-key"
REPLAYED_HEADER = "idempotent-replayed"

MAX_SERVER_WAIT = 60.0
"""The longest wait, in seconds, the server accepts in one WaitTask or
LeaseTasks call; longer waits are made of several calls."""

WAIT_GRACE = 10.0
"""How much longer than its own wait a WaitTask or LeaseTasks attempt may
take before its deadline cuts it: time for the answer to arrive."""


class Client:
    """A client for oncely's TaskService and WorkerService that retries
    safely.

    ``create_task`` makes one UUID v4 idempotency key per call (or takes
    yours) and sends it on every attempt, so however often it retries the
    server creates one task. Transient failures (``UNAVAILABLE``,
    ``DEADLINE_EXCEEDED``, ``ABORTED``, ``CANCELLED``) are retried with
    exponential backoff and full jitter, never sooner than the server's
    ``RetryInfo`` asks; every other error is raised at once as
    :class:`~oncely.Rejected`. When the attempts or the time of the
    :class:`~oncely.RetryPolicy` run out, :class:`~oncely.GaveUp` is raised.
    Reads are retried the same way, since they are safe to repeat.

    The worker's calls (:meth:`lease_tasks`, :meth:`renew_lease`,
    :meth:`complete_task`, :meth:`fail_task`) are here too; the
    :class:`~oncely.Worker` helper runs them in a loop.

    Use it as a context manager, or call :meth:`close`. One client may be
    shared by threads.

    On a server with API keys every call sends the metadata
    ``authorization: Bearer <token>``. A missing, unknown or revoked key is
    refused ``UNAUTHENTICATED`` (reason ``API_KEY_INVALID``), a key whose
    role or scope does not allow the call ``PERMISSION_DENIED`` (reason
    ``PERMISSION_DENIED``); both raise :class:`~oncely.Rejected` at once and
    are never retried. ``repr(client)`` never shows the key.

    Args:
        target: The server: ``"127.0.0.1:50051"`` or
            ``"http://127.0.0.1:50051"`` (plaintext), or
            ``"https://oncely.example:443"`` (TLS, never plaintext). The
            channel connects on first use and reconnects by itself.
        api_key: The API key, as ``oncely keys create`` prints it (the token
            alone, without ``Bearer``; surrounding whitespace is dropped).
            None (the default) takes the environment variable
            ``ONCELY_API_KEY`` if it is set and not blank, and sends no key
            otherwise; ``""`` sends no key whatever the environment says.
            A token that is not visible ASCII raises ValueError (which does
            not show it).
        retry_policy: How hard to try; :class:`~oncely.RetryPolicy` defaults
            if None.
        tls_ca: For an ``https://`` target: a PEM CA certificate (bytes, or
            a path to the file) to trust instead of the system's roots.
        channel: A channel of your own (say, with interceptors), instead of
            ``target``. The caller keeps it: :meth:`close` leaves it open.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        retry_policy: RetryPolicy | None = None,
        channel: grpc.Channel | None = None,
        tls_ca: bytes | str | os.PathLike[str] | None = None,
    ) -> None:
        self._policy = retry_policy or RetryPolicy()
        if (target is None) == (channel is None):
            raise ValueError("give either a target address or a channel")
        # The metadata every call sends: the key, or nothing.
        self._auth = auth_metadata(resolve_api_key(api_key))
        self._owns_channel = channel is None
        self._target = None if target is None else channel_target(target)
        if channel is None:
            options = channel_options(self._policy)
            if target is not None and is_secure(target):
                # TLS for https://, trusting the system's roots, or tls_ca.
                root = tls_ca if isinstance(tls_ca, bytes) or tls_ca is None else Path(tls_ca).read_bytes()
                credentials = grpc.ssl_channel_credentials(root_certificates=root)
                channel = grpc.secure_channel(cast(str, self._target), credentials, options=options)
            elif tls_ca is not None:
                raise ValueError("tls_ca is for an https:// target")
            else:
                channel = grpc.insecure_channel(cast(str, self._target), options=options)
        self._channel = channel
        self._stub = tasks_pb2_grpc.TaskServiceStub(channel)
        self._worker_stub = worker_pb2_grpc.WorkerServiceStub(channel)

    @property
    def retry_policy(self) -> RetryPolicy:
        """The policy every call of this client follows."""
        return self._policy

    @property
    def has_api_key(self) -> bool:
        """Whether every call sends an API key (given, or from
        ``ONCELY_API_KEY``)."""
        return bool(self._auth)

    def __repr__(self) -> str:
        where = f"target={self._target!r}" if self._target is not None else "channel=..."
        return f"Client({where}, api_key={'***' if self._auth else None!r})"

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
        if not VALID_KEY.fullmatch(key):
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

    def wait_task(self, task_id: str, timeout: float = 30.0) -> Task:
        """Waits until the task is finished (``SUCCEEDED``, ``FAILED`` or
        ``CANCELLED``) and returns it; when ``timeout`` runs out first,
        returns the task as it is then (check :attr:`Task.finished`).

        The server waits at most 60 s per call, so longer waits are made of
        several WaitTask calls. Transient failures are retried as the
        :class:`~oncely.RetryPolicy` says (its ``max_attempts`` counts
        failures in a row; ``attempt_timeout`` and ``total_timeout`` do not
        apply, ``timeout`` does).

        Args:
            task_id: The task's id.
            timeout: How long to wait at most, in seconds; 0 returns the
                task at once.

        Raises:
            Rejected: ``NOT_FOUND`` if there is no such task,
                ``INVALID_ARGUMENT`` if ``task_id`` is not a UUID.
            GaveUp: Transient failures until the policy or ``timeout`` ran
                out.
            ValueError: ``timeout`` is negative.
        """
        to_duration(timeout, "timeout")
        policy = self._policy
        deadline = time.monotonic() + timeout
        failures = 0
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            piece = min(MAX_SERVER_WAIT, remaining)
            last = piece == remaining  # the server waits out the rest of the timeout
            request = tasks_pb2.WaitTaskRequest(task_id=task_id, timeout=to_duration(piece, "timeout"))
            try:
                response = self._stub.WaitTask(
                    request, metadata=self._auth + trace_metadata(), timeout=piece + WAIT_GRACE
                )
            except grpc.RpcError as error:
                failures += 1
                failed = cast(grpc.Call, error)
                code, message = failed.code(), failed.details() or ""
                status = rpc_status(failed.trailing_metadata())
                if not is_transient(code, retry_info_delay(status)):
                    raise Rejected(code, message, status=status, attempts=failures) from error
                wait = backoff_delay(policy, failures, retry_delay(status))
                if failures >= policy.max_attempts or time.monotonic() + wait >= deadline:
                    raise GaveUp(code, message, status=status, attempts=failures) from error
                time.sleep(wait)
                continue
            failures = 0
            task = Task.from_proto(response)
            if task.finished or last or time.monotonic() >= deadline:
                return task

    def cancel_task(self, task_id: str) -> Task:
        """Cancels a queued or running task and returns it, ``CANCELLED``. A
        running task's worker learns it at its next heartbeat
        (:meth:`renew_lease` fails with reason ``TASK_CANCELLED``); what it
        already did is not undone. A finished task is returned unchanged, so
        repeating the call is safe (and it is retried like a read).

        Raises:
            Rejected: ``NOT_FOUND`` if there is no such task,
                ``INVALID_ARGUMENT`` if ``task_id`` is not a UUID.
            GaveUp: Transient failures until the policy ran out.
        """
        task, _, _ = self._call(self._stub.CancelTask, tasks_pb2.CancelTaskRequest(task_id=task_id))
        return Task.from_proto(task)

    def lease_tasks(
        self,
        worker_id: str,
        actions: Iterable[str] = (),
        max_tasks: int = 1,
        lease_duration: float | None = None,
        wait: float | None = None,
    ) -> list[Lease]:
        """Leases up to ``max_tasks`` tasks, oldest first, for a worker to
        perform. Each comes ``RUNNING`` with its attempt number and a token;
        renew the lease while working (:meth:`renew_lease`, at least every
        third of ``lease_duration``), then call :meth:`complete_task` or
        :meth:`fail_task`.

        Delivery is at least once: a task whose lease runs out (the worker
        crashed, say) goes to another worker. Use the task id as the
        idempotency key of the side effect's own call, so that it still
        happens once.

        Transient failures are retried. A lost answer leaves its tasks
        leased to nobody until their leases run out; then they are leased
        again.

        Args:
            worker_id: Who is asking (1 to 255 bytes), shown in the server's
                logs.
            actions: The actions this worker performs; empty means any.
            max_tasks: How many tasks at most, 1 to 100.
            lease_duration: How long each lease lasts, in seconds (1 to
                3600); None means the server's default (30 s).
            wait: How long to wait for a task when none is available, in
                seconds (a long poll, at most 60); the call returns as soon
                as one is. None or 0 means not at all.

        Returns:
            The leases, oldest task first; empty when no task was available
            in time.

        Raises:
            Rejected: ``INVALID_ARGUMENT`` for an empty ``worker_id`` or a
                value out of range (``field_violations`` names it).
            GaveUp: Transient failures until the policy ran out.
        """
        request = worker_pb2.LeaseTasksRequest(worker_id=worker_id, actions=list(actions), max_tasks=max_tasks)
        if lease_duration is not None:
            request.lease_duration.CopyFrom(to_duration(lease_duration, "lease_duration"))
        if wait is not None:
            request.wait.CopyFrom(to_duration(wait, "wait"))
        long_poll = wait or 0.0
        response, _, _ = self._call(
            self._worker_stub.LeaseTasks,
            request,
            attempt_timeout=max(self._policy.attempt_timeout, long_poll + WAIT_GRACE) if long_poll else None,
            total_timeout=self._policy.total_timeout + long_poll,
        )
        return [Lease.from_proto(lease) for lease in response.leases]

    def renew_lease(
        self, lease: Lease, lease_duration: float | None = None, *, timeout: float | None = None
    ) -> Lease:
        """Extends a lease from now: the heartbeat of a worker still working
        on the task. Returns the renewed lease (use it, or keep using its
        token, for the later calls). Transient failures are retried.

        Args:
            lease: The lease to extend, from :meth:`lease_tasks` or an
                earlier renewal.
            lease_duration: How long from now the lease lasts, in seconds (1
                to 3600); None means the server's default (30 s).
            timeout: The most seconds all attempts may take, instead of the
                policy's total time: a heartbeat retries only until the next
                one is due, so an outage cannot hold it past the lease.

        Raises:
            Rejected: ``FAILED_PRECONDITION`` with reason ``TASK_CANCELLED``
                (the task was cancelled: stop working on it),
                ``LEASE_LOST`` (the lease ran out and the task may be with
                another worker: stop) or ``TASK_FINISHED``.
            GaveUp: Transient failures until the policy ran out; the lease
                may still hold until its ``expire_time``.
        """
        request = worker_pb2.RenewLeaseRequest(task_id=lease.task.task_id, lease_token=lease.lease_token)
        if lease_duration is not None:
            request.lease_duration.CopyFrom(to_duration(lease_duration, "lease_duration"))
        renewed, _, _ = self._call(
            self._worker_stub.RenewLease,
            request,
            attempt_timeout=None if timeout is None else min(self._policy.attempt_timeout, timeout),
            total_timeout=timeout,
        )
        return Lease.from_proto(renewed)

    def complete_task(self, lease: Lease, result: Mapping[str, Any] | None = None) -> Task:
        """Marks the leased task ``SUCCEEDED`` with ``result`` and returns
        it. Transient failures are retried with the same token: completing
        again with the same token and result returns the same task, so a
        lost answer cannot complete it twice or fail the call.

        Args:
            lease: The task's lease.
            result: What the task produced, a JSON-like mapping; None means
                an empty object. Anything else raises TypeError or
                ValueError before a call is made.

        Raises:
            Rejected: ``FAILED_PRECONDITION`` with reason ``LEASE_LOST`` (the
                lease ran out and another worker may have the task),
                ``TASK_CANCELLED`` or ``TASK_FINISHED``; ``INVALID_ARGUMENT``
                for a result too large.
            GaveUp: Transient failures until the policy ran out: the task
                may or may not be completed; calling again with the same
                lease and result is safe.
        """
        request = worker_pb2.CompleteTaskRequest(task_id=lease.task.task_id, lease_token=lease.lease_token)
        request.result.CopyFrom(to_struct(result, "result"))
        task, _, _ = self._call(self._worker_stub.CompleteTask, request)
        return Task.from_proto(task)

    def fail_task(
        self,
        lease: Lease,
        message: str,
        *,
        permanent: bool = False,
        retry_after: float | None = None,
    ) -> Task:
        """Records that an attempt at the leased task failed, and returns the
        task. A retryable failure puts it back in the queue (``QUEUED``)
        after ``retry_after`` or the server's backoff, unless this was its
        last allowed attempt; a permanent one, or the last attempt, ends it
        ``FAILED`` with ``message``.

        Transient failures are retried with the same token. If an earlier
        attempt did record the failure before its answer was lost, the next
        one is refused (``LEASE_LOST`` or ``TASK_FINISHED``): a
        :class:`~oncely.Rejected` with ``attempts`` above 1 may mean the
        failure was recorded.

        Args:
            lease: The task's lease.
            message: What went wrong, kept on the task as
                :attr:`Task.error_message` (cut to 8 KiB).
            permanent: True when retrying cannot help.
            retry_after: Retry no sooner than this many seconds from now;
                None means the server's backoff.

        Raises:
            Rejected: ``FAILED_PRECONDITION`` with reason ``LEASE_LOST``,
                ``TASK_CANCELLED`` or ``TASK_FINISHED``.
            GaveUp: Transient failures until the policy ran out; the lease
                runs out in time and the task is leased again.
        """
        request = worker_pb2.FailTaskRequest(
            task_id=lease.task.task_id,
            lease_token=lease.lease_token,
            error_message=message,
            permanent=permanent,
        )
        if retry_after is not None:
            request.retry_after.CopyFrom(to_duration(retry_after, "retry_after"))
        task, _, _ = self._call(self._worker_stub.FailTask, request)
        return Task.from_proto(task)

    def _call(
        self,
        method: Any,
        request: Any,
        *,
        key: str | None = None,
        attempt_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> tuple[Any, grpc.Call, int]:
        """Calls the unary ``method`` until it succeeds, fails for good or the
        policy runs out; returns the response, the call and the number of
        attempts. ``attempt_timeout`` and ``total_timeout`` replace the
        policy's (for long polls)."""
        policy = self._policy
        # The trace context of the caller's current span, read once: every
        # attempt of the call belongs to it.
        metadata = (
            self._auth + trace_metadata() + (((IDEMPOTENCY_KEY_HEADER, key),) if key is not None else ())
        )
        deadline = time.monotonic() + (policy.total_timeout if total_timeout is None else total_timeout)
        per_attempt = policy.attempt_timeout if attempt_timeout is None else attempt_timeout
        attempts = 0
        while True:
            attempts += 1
            timeout = min(per_attempt, deadline - time.monotonic())
            try:
                response, call = method.with_call(request, metadata=metadata, timeout=timeout)
                return response, call, attempts
            except grpc.RpcError as error:
                failed = cast(grpc.Call, error)
                code, message = failed.code(), failed.details() or ""
                status = rpc_status(failed.trailing_metadata())
                if not is_transient(code, retry_info_delay(status)):
                    raise Rejected(code, message, status=status, attempts=attempts, key=key) from error
                wait = backoff_delay(policy, attempts, retry_delay(status))
                if attempts >= policy.max_attempts or time.monotonic() + wait >= deadline:
                    raise GaveUp(code, message, status=status, attempts=attempts, key=key) from error
                time.sleep(wait)
