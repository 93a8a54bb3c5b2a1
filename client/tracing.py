"""The caller's trace context on every call: when OpenTelemetry is installed (the `trace`
extra) and the caller has an active span, its `traceparent` (and `tracestate`) travel in
the call's metadata, so the server's spans join the caller's trace. Without OpenTelemetry
installed nothing is imported and nothing is sent."""

from __future__ import annotations

try:
    from opentelemetry import propagate
    from opentelemetry import trace as _trace
except ImportError:  # the SDK does not need OpenTelemetry
    propagate = None


def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """The gRPC metadata that carries the active span's context, or None (no OpenTelemetry,
    or no active span)."""
    if propagate is None or not _trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None
