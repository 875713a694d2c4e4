"""What the client sends, made from Python values: durations, structs,
the channel's target and options. Pure functions, testable alone."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from ._retry import RetryPolicy


def to_duration(seconds: float, name: str) -> duration_pb2.Duration:
    """``seconds`` as a ``google.protobuf.Duration``, to the nanosecond.
    Raises ValueError for a negative or non-finite number, naming the
    argument ``name``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name} must be a finite number of seconds, not negative: {seconds!r}")
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


# The server's key rules: 1 to 255 characters of visible ASCII.
VALID_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def is_secure(target: str) -> bool:
    """Whether a server address asks for TLS: an ``https://`` URL."""
    return target.strip().lower().startswith("https://")


def channel_target(target: str) -> str:
    """The grpcio target for a server address: ``host:port``, or an
    ``http://host:port`` or ``https://host:port`` URL (the scheme is
    dropped; :func:`is_secure` tells whether it asked for TLS)."""
    target = target.strip()
    for scheme in ("http://", "https://"):
        if target.lower().startswith(scheme):
            target = target[len(scheme) :].rstrip("/")
    if not target:
        raise ValueError("the server address is empty")
    return target


def channel_options(policy: RetryPolicy) -> list[tuple[str, int]]:
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


def to_struct(value: Mapping[str, Any] | None, name: str) -> struct_pb2.Struct:
    """A JSON-like mapping (None for an empty one) as a
    ``google.protobuf.Struct``. Raises TypeError or ValueError, naming the
    argument ``name``, for anything else: keys must be strings, values
    None, bools, numbers, strings, lists or such mappings."""
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping (or None), not {type(value).__name__}")
    struct = struct_pb2.Struct()
    try:
        struct.update(value or {})
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"{name} must be JSON-like (string keys; None, bool, number, string, list or mapping values): {error}"
        ) from error
    return struct
