"""W3C trace context on outgoing calls, when OpenTelemetry is installed.

With ``opentelemetry-api`` installed (``pip install 'oncely[tracing]'``),
every call carries the caller's current trace context (``traceparent``,
``tracestate``, as the configured propagator writes them), so the server's
spans join the agent's trace. Without it, nothing is added.
"""

from __future__ import annotations

try:
    from opentelemetry import propagate as _propagate
except ImportError:  # pragma: no cover - depends on what is installed
    _propagate = None


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata; empty without
    OpenTelemetry or outside any span."""
    if _propagate is None:
        return ()
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return tuple((name.lower(), value) for name, value in carrier.items())
