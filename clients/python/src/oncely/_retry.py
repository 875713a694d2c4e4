"""The retry rules: one key per logical call, which codes to retry, and how
long to wait between attempts. Everything here is a pure function of its
arguments (randomness is passed in), so the rules can be tested alone."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
"""The status codes worth retrying with the same key: the server was
unreachable or failing, the attempt ran out of time, a request with the key
was still in progress (``ABORTED``), or the call was cut. Every other code,
``INVALID_ARGUMENT``, ``FAILED_PRECONDITION``, ``UNAUTHENTICATED`` and
``PERMISSION_DENIED`` in particular, would fail the same way again, except
``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` (see :func:`is_transient`)."""


def is_transient(code: grpc.StatusCode, retry_delay: float | None) -> bool:
    """Whether a failed attempt may pass if repeated with the same key: a
    code in :data:`TRANSIENT_CODES`, or ``RESOURCE_EXHAUSTED`` when the
    server said when to come back (a rate limit, a shed call;
    ``retry_delay`` is its ``RetryInfo`` delay, None without one). A request
    that is simply too large has no ``RetryInfo`` and is not retried."""
    return code in TRANSIENT_CODES or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay is not None)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a :class:`~oncely.Client` tries before giving up. Times are
    in seconds.

    Before attempt *n* + 1 the client waits a random time between 0 and
    ``min(max_backoff, initial_backoff * 2 ** (n - 1))`` (exponential backoff
    with full jitter), but never less than the ``RetryInfo`` delay the server
    asked for.
    """

    max_attempts: int = 6
    """The most attempts, the first included (at least 1)."""
    initial_backoff: float = 0.1
    """The backoff ceiling before the second attempt; it doubles each time."""
    max_backoff: float = 5.0
    """The largest backoff ceiling."""
    attempt_timeout: float = 10.0
    """The deadline of one attempt."""
    total_timeout: float = 60.0
    """The most time all attempts and waits of one call may take together."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("initial_backoff and max_backoff must not be negative")
        if self.attempt_timeout <= 0 or self.total_timeout <= 0:
            raise ValueError("attempt_timeout and total_timeout must be positive")


def new_idempotency_key() -> str:
    """A new idempotency key: a random UUID v4 in its canonical text form.

    Make one per logical call, before its first attempt. If the agent may
    crash during the call, store the key with the call's state and pass it
    to :meth:`~oncely.Client.create_task` again after the restart.
    """
    return str(uuid.uuid4())


def backoff_ceiling(policy: RetryPolicy, attempt: int) -> float:
    """The longest jittered wait after failed attempt number ``attempt``
    (counting from 1): ``min(max_backoff, initial_backoff * 2 ** (attempt - 1))``."""
    exponent = min(max(attempt - 1, 0), 32)
    return min(policy.max_backoff, policy.initial_backoff * (1 << exponent))


def backoff_delay(
    policy: RetryPolicy,
    attempt: int,
    server_delay: float = 0.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """How long to wait after failed attempt number ``attempt``: full
    jitter, ``rand()`` (a number in [0, 1)) times the
    :func:`backoff_ceiling`, but at least ``server_delay`` (the server's
    ``RetryInfo``)."""
    return max(rand() * backoff_ceiling(policy, attempt), server_delay)
