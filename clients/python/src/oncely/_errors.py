"""The errors the client raises, and the reading of the ``google.rpc``
details oncely attaches to its errors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Union

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "oncely"
"""The ``domain`` of the ``ErrorInfo`` oncely attaches to its errors."""

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""The trailer holding the serialized ``google.rpc.Status``."""

Metadata = Iterable[tuple[str, Union[str, bytes]]]
"""Response metadata as grpcio gives it: (key, value) pairs; values are
``bytes`` for keys ending in ``-bin`` and ``str`` otherwise."""


def rpc_status(trailing_metadata: Metadata | None) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` in an error's trailers, or None if there is
    none (or it cannot be parsed)."""
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def retry_delay(status: status_pb2.Status | None) -> float:
    """The wait in seconds a ``RetryInfo`` detail asks for, or 0."""
    asked = retry_info_delay(status)
    return 0.0 if asked is None else asked


def retry_info_delay(status: status_pb2.Status | None) -> float | None:
    """The wait in seconds a ``RetryInfo`` detail asks for; None without
    one."""
    info = error_details_pb2.RetryInfo()
    for detail in status.details if status is not None else ():
        if detail.Unpack(info):
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def error_reason(status: status_pb2.Status | None) -> str | None:
    """The ``reason`` of the ``ErrorInfo`` detail in oncely's domain, or
    None."""
    info = error_details_pb2.ErrorInfo()
    for detail in status.details if status is not None else ():
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return str(info.reason)
    return None


def field_violations(status: status_pb2.Status | None) -> list[tuple[str, str]]:
    """The ``(field, description)`` pairs of the ``BadRequest`` details."""
    request = error_details_pb2.BadRequest()
    violations: list[tuple[str, str]] = []
    for detail in status.details if status is not None else ():
        if detail.Unpack(request):
            violations += [(v.field, v.description) for v in request.field_violations]
    return violations


class OncelyError(Exception):
    """A call to oncely failed. The base class of :class:`Rejected` and
    :class:`GaveUp`; the attributes describe the last attempt's error.

    Attributes:
        code: The gRPC status code.
        message: The server's (or grpcio's) message.
        reason: The stable ``ErrorInfo`` reason in oncely's domain, such as
            ``"IDEMPOTENCY_KEY_REUSED"``, or None when the error has none.
        status: The full ``google.rpc.Status`` the server attached, or None.
        attempts: How many attempts the call made.
        key: The idempotency key the call sent (None for reads). After
            :class:`GaveUp`, retry the same logical call later with this key.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        status: status_pb2.Status | None = None,
        attempts: int = 1,
        key: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.status = status
        self.attempts = attempts
        self.key = key

    @property
    def reason(self) -> str | None:
        """The ``ErrorInfo`` reason in oncely's domain, or None."""
        return error_reason(self.status)

    def _describe(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} (reason {self.reason})" if self.reason else text


class Rejected(OncelyError):
    """The server refused the request, and sending it again unchanged cannot
    help: ``INVALID_ARGUMENT`` (fix the request; :attr:`field_violations`
    names the fields), ``FAILED_PRECONDITION`` (the key was used for a
    different request: make a new key for a new request), ``NOT_FOUND``,
    ``UNAUTHENTICATED`` (reason ``API_KEY_INVALID``: no API key, or one the
    server does not know or that was revoked), ``PERMISSION_DENIED`` (the
    key's role or scope does not allow the call), or any other code that is
    not worth retrying."""

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """The ``(field, description)`` pairs of the ``BadRequest`` details;
        empty when there are none."""
        return field_violations(self.status)

    def __str__(self) -> str:
        return f"the server refused the request: {self._describe()}"


class GaveUp(OncelyError):
    """Every attempt failed with a transient error (see
    :data:`~oncely.TRANSIENT_CODES`) until the attempts or the time of the
    :class:`~oncely.RetryPolicy` ran out. For a create, the task may or may
    not exist: retry later with the same :attr:`key` to find out safely."""

    def __str__(self) -> str:
        return f"gave up after {self.attempts} attempts: {self._describe()}"
