"""The worker helper: a lease loop that performs tasks with a handler of
yours, renews each lease while the handler runs, and completes or fails the
task by how the handler ended."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import grpc

from ._client import Client
from ._errors import GaveUp, OncelyError, Rejected
from ._models import Lease, Task
from ._retry import RetryPolicy, backoff_delay

logger = logging.getLogger("oncely.worker")

Handler = Callable[[Task], Optional[Mapping[str, Any]]]
"""Performs one task: takes the :class:`~oncely.Task` and returns its
result (a JSON-like mapping, or None for an empty one)."""

LOST_REASONS = frozenset({"LEASE_LOST", "TASK_CANCELLED", "TASK_FINISHED"})
"""The ``ErrorInfo`` reasons that say a lease is no longer this worker's:
the task was cancelled, finished, or went to another worker."""

# The pause after a failed LeaseTasks call (GaveUp), growing like the
# client's backoff up to its maximum.
_IDLE_BACKOFF = RetryPolicy(initial_backoff=1.0, max_backoff=30.0)


class PermanentError(Exception):
    """Raised by a :class:`Worker` handler when retrying the task cannot
    help (bad parameters, a refused request): the task ends ``FAILED`` with
    this error's message at once. Any other exception from a handler is a
    retryable failure: the task is queued again after the server's backoff,
    until its last allowed attempt."""


def failure_message(error: BaseException) -> str:
    """The message a failed task keeps: the error's type and text."""
    text = str(error)
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def heartbeat_interval(lease_duration: float) -> float:
    """How often a lease of ``lease_duration`` seconds is renewed: every
    third of it, so that two renewals in a row can fail before it runs
    out."""
    return lease_duration / 3


def is_lost(error: OncelyError) -> bool:
    """True when ``error`` says the lease is no longer this worker's
    (``FAILED_PRECONDITION`` with a reason in :data:`LOST_REASONS`), so
    nothing more is to be done about the task."""
    return error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason in LOST_REASONS


class Worker:
    """Performs tasks with ``handler``: leases them (a long poll), renews
    each lease while the handler runs (a heartbeat thread, every third of
    ``lease_duration``), completes the task with what the handler returns,
    and fails it when the handler raises (permanently for
    :class:`PermanentError`).

    ``concurrency`` threads each lease and perform one task at a time.
    Several workers, in one process or many, may serve the same actions: the
    server gives each task to one lease at a time. Delivery is still at
    least once (a worker that crashes after the side effect and before the
    completion leaves the task to be leased again), so make the handler's
    side effect idempotent by the task id.

        def send_email(task: oncely.Task) -> dict:
            message_id = mailer.send(task.parameters, idempotency_key=task.task_id)
            return {"message_id": message_id}

        stop = threading.Event()
        oncely.Worker(client, "mailer-1", ["send_email"], send_email).run(stop)

    Args:
        client: The client to call the server with; its API key (see
            :class:`~oncely.Client`) goes with every call, so on a server
            with keys give it a ``worker`` (or ``admin``) key.
        worker_id: Who this worker is, shown in the server's logs (1 to
            255 bytes).
        actions: The actions it performs; empty means any.
        handler: Performs one task; see :data:`Handler`.
        concurrency: How many tasks at once (threads).
        lease_duration: How long each lease lasts, in seconds (1 to 3600).
        poll_wait: How long one LeaseTasks call waits for a task, in
            seconds (at most 60). A stop waits at most this long for the
            calls in flight.
    """

    def __init__(
        self,
        client: Client,
        worker_id: str,
        actions: Iterable[str],
        handler: Handler,
        concurrency: int = 1,
        lease_duration: float = 30,
        poll_wait: float = 20,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if not 1 <= lease_duration <= 3600:
            raise ValueError(f"lease_duration must be 1 to 3600 seconds, not {lease_duration}")
        if not 0 <= poll_wait <= 60:
            raise ValueError(f"poll_wait must be 0 to 60 seconds, not {poll_wait}")
        self.client = client
        self.worker_id = worker_id
        self.actions = tuple(actions)
        self.handler = handler
        self.concurrency = concurrency
        self.lease_duration = float(lease_duration)
        self.poll_wait = float(poll_wait)
        self._fatal: list[BaseException] = []
        self._fatal_lock = threading.Lock()

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Performs tasks until ``stop_event`` is set, then returns once every
        thread has finished the task in hand (and its LeaseTasks call in
        flight, at most ``poll_wait`` later). Without an event it runs until
        an error stops it.

        Errors of the server or the network are logged (logger
        ``oncely.worker``) and the loop goes on, except a refused LeaseTasks
        call (say, an invalid ``worker_id``, or an API key refused with
        ``UNAUTHENTICATED`` or ``PERMISSION_DENIED``): then every thread
        stops and the :class:`~oncely.Rejected` is raised here.
        """
        stop = stop_event if stop_event is not None else threading.Event()
        halt = threading.Event()  # set when a thread hit a fatal error
        threads = [
            threading.Thread(
                target=self._slot, args=(stop, halt), name=f"oncely-worker-{self.worker_id}-{n}", daemon=True
            )
            for n in range(self.concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            # A join with a timeout lets the calling (main) thread run its
            # signal handlers, which may set stop_event.
            while thread.is_alive():
                thread.join(timeout=0.5)
        if self._fatal:
            raise self._fatal[0]

    def _slot(self, stop: threading.Event, halt: threading.Event) -> None:
        """One thread's loop: lease one task, perform it, again."""
        idle_failures = 0
        while not stop.is_set() and not halt.is_set():
            try:
                leases = self.client.lease_tasks(
                    self.worker_id,
                    self.actions,
                    max_tasks=1,
                    lease_duration=self.lease_duration,
                    wait=self.poll_wait,
                )
            except Rejected as error:
                logger.error("%s: leasing tasks was refused, stopping: %s", self.worker_id, error)
                with self._fatal_lock:
                    self._fatal.append(error)
                halt.set()
                return
            except GaveUp as error:
                idle_failures += 1
                pause = backoff_delay(_IDLE_BACKOFF, idle_failures)
                logger.warning("%s: leasing tasks failed, trying again in %.1fs: %s", self.worker_id, pause, error)
                stop.wait(pause)
                continue
            idle_failures = 0
            for lease in leases:
                try:
                    self._perform(lease)
                except Exception:  # a bug must not end the loop; the lease runs out
                    logger.exception("%s: performing task %s failed", self.worker_id, lease.task.task_id)

    def _perform(self, lease: Lease) -> None:
        """Runs the handler on a leased task with a heartbeat, then completes
        or fails the task."""
        task = lease.task
        logger.info("%s: performing task %s (%s, attempt %d)", self.worker_id, task.task_id, task.action, task.attempt)
        done = threading.Event()
        lost = threading.Event()
        current = [lease]  # the latest renewal, kept by the heartbeat
        heartbeat = threading.Thread(
            target=self._heartbeat,
            args=(current, done, lost),
            name=f"oncely-heartbeat-{task.task_id}",
            daemon=True,
        )
        heartbeat.start()
        result: Mapping[str, Any] | None = None
        failure: tuple[str, bool] | None = None  # (message, permanent)
        try:
            result = self.handler(task)
        except PermanentError as error:
            failure = (failure_message(error), True)
        except Exception as error:  # noqa: BLE001 - any handler error is a failed attempt
            failure = (failure_message(error), False)
        finally:
            done.set()
            heartbeat.join()

        if lost.is_set():
            logger.warning(
                "%s: task %s is no longer leased to this worker (cancelled, finished or expired); its outcome is dropped",
                self.worker_id,
                task.task_id,
            )
            return
        try:
            if failure is None:
                try:
                    self.client.complete_task(current[0], result)
                    logger.info("%s: task %s succeeded", self.worker_id, task.task_id)
                    return
                except (TypeError, ValueError) as error:
                    # Not a JSON-like mapping: a bug of the handler's.
                    failure = (f"the handler's result cannot be sent: {failure_message(error)}", True)
                except Rejected as error:
                    if error.code != grpc.StatusCode.INVALID_ARGUMENT:
                        raise
                    # Too large, say: completing again cannot help.
                    failure = (f"the handler's result was refused: {error.message}", True)
            message, permanent = failure
            after = self.client.fail_task(current[0], message, permanent=permanent)
            logger.warning("%s: task %s failed (%s), now %s", self.worker_id, task.task_id, message, after.status)
        except OncelyError as error:
            # The lease runs out and the task is leased again, or it was
            # cancelled or finished meanwhile: nothing more to do here.
            logger.warning("%s: recording the outcome of task %s failed: %s", self.worker_id, task.task_id, error)

    def _heartbeat(self, current: list[Lease], done: threading.Event, lost: threading.Event) -> None:
        """Renews the lease in ``current[0]`` every third of the lease
        duration until ``done`` is set, keeping the renewed lease there; sets
        ``lost`` when the server says the lease is gone."""
        interval = heartbeat_interval(self.lease_duration)
        while not done.wait(interval):
            lease = current[0]
            try:
                # Retried only until the next beat is due, never past the
                # lease, so the handler's outcome is not held back by it.
                current[0] = self.client.renew_lease(lease, self.lease_duration, timeout=interval)
            except OncelyError as error:
                if is_lost(error):
                    logger.warning(
                        "%s: task %s: the lease is gone (%s)", self.worker_id, lease.task.task_id, error.reason
                    )
                    lost.set()
                    return
                # Transient, or refused for another reason: the lease may
                # still hold; try again at the next beat.
                logger.warning(
                    "%s: renewing the lease of task %s failed: %s", self.worker_id, lease.task.task_id, error
                )
