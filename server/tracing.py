"""OpenTelemetry tracing: one server span per request, its hops as child spans, one span per
engine batch linked both ways to the requests it holds.

Off unless `--trace` is given or an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); when off, no span is made and the request path only
tests for None. Everything else is the standard `OTEL_*` variables, read by the SDK: the
exporter's endpoint, headers and timeout, `OTEL_TRACES_SAMPLER` / `_ARG`, `OTEL_BSP_*`,
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_PROPAGATORS` (W3C `traceparent` /
`tracestate` by default). `OTEL_TRACES_EXPORTER=console` writes spans to stdout instead.

A request's context comes from its gRPC metadata or HTTP headers. A batch span is sampled
whenever a request it holds is (a span linked to a sampled span is sampled), so a sampled
request always shows the batches it joined. The tracer provider is this server's own, never
the process-wide one: several servers may share a process (tests), and the application's
own tracing, if any, is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from collections.abc import Iterable, Mapping, Sequence

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from gradserve.server.core.scheduler import Part
from gradserve.wire.timing import HOP_FIELDS, HOPS, Hops

log = logging.getLogger(__name__)

SCOPE = "gradserve.server"
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# The standard sampler names (OTEL_TRACES_SAMPLER) and how each is made from its argument.
_SAMPLERS = {
    "always_on": lambda arg: sampling.ALWAYS_ON,
    "always_off": lambda arg: sampling.ALWAYS_OFF,
    "traceidratio": lambda arg: sampling.TraceIdRatioBased(arg),
    "parentbased_always_on": lambda arg: sampling.ParentBased(sampling.ALWAYS_ON),
    "parentbased_always_off": lambda arg: sampling.ParentBased(sampling.ALWAYS_OFF),
    "parentbased_traceidratio": lambda arg: sampling.ParentBased(sampling.TraceIdRatioBased(arg)),
}
_PERF_TO_WALL_NS = time.time_ns() - time.perf_counter_ns()
_CONTEXT = struct.Struct("<16s8sB")  # trace id, span id, trace flags


class Remote(tuple):
    """The span contexts of requests traced in another process (a sub-batch's)."""


def pack_contexts(spans: Sequence[trace.Span]) -> bytes:
    """The contexts of request spans as bytes, for the engine process (a sub-batch's)."""
    packed = []
    for span in spans:
        context = span.get_span_context()
        ids = (context.trace_id.to_bytes(16, "big"), context.span_id.to_bytes(8, "big"))
        packed.append(_CONTEXT.pack(*ids, context.trace_flags))
    return b"".join(packed)


def unpack_contexts(data: bytes) -> Remote:
    """What pack_contexts packed; ValueError for bytes that are not whole contexts."""
    if len(data) % _CONTEXT.size:
        raise ValueError(f"{len(data)} bytes of trace contexts; each takes {_CONTEXT.size}")
    return Remote(
        SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"),
                    is_remote=True, trace_flags=TraceFlags(flags))
        for trace_id, span_id, flags in _CONTEXT.iter_unpack(data)
    )  # fmt: skip


def wall_ns(perf: float) -> int:
    """A time.perf_counter() reading as epoch nanoseconds (what spans are stamped with)."""
    return int(perf * 1e9) + _PERF_TO_WALL_NS


def wanted(trace_flag: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this server traces: --trace, or an OTLP endpoint set, unless the SDK is
    disabled or the exporter is `none`."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
        return False
    return trace_flag or any(environ.get(name) for name in _ENDPOINTS)


class _LinkedToSampled(sampling.Sampler):
    """The configured sampler, except that a span linked to a sampled span is sampled: a
    batch is traced whenever a request it holds is."""

    def __init__(self, configured: sampling.Sampler) -> None:
        self._configured = configured

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None) -> sampling.SamplingResult:  # fmt: skip
        if links and any(link.context.trace_flags.sampled for link in links):
            return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE, attributes)
        return self._configured.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"LinkedToSampled{{{self._configured.get_description()}}}"


def configured_sampler(environ: Mapping[str, str] = os.environ) -> sampling.Sampler:
    """OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on)."""
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name not in _SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER is {name!r}; expected one of {', '.join(_SAMPLERS)}")
    raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG is {raw!r}; expected a ratio in [0, 1]")
    return _SAMPLERS[name](ratio)


def _exporter(environ: Mapping[str, str]):
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "console":
        return ConsoleSpanExporter()
    protocol = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol != "grpc":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL is {protocol!r}; gradserve exports grpc")
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _carrier(pairs: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """The propagation headers of gRPC metadata (binary values are never trace context)."""
    return {key: value for key, value in pairs if isinstance(value, str)}


class Tracing:
    """This server's tracer: request spans, their hops, batch spans. Use `Tracing.start`."""

    def __init__(self, provider: TracerProvider, hop_spans: bool = False) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer(SCOPE)
        self._hop_spans = hop_spans

    @classmethod
    def start(
        cls,
        trace_flag: bool,
        process: str,
        hop_spans: bool = False,
        environ: Mapping[str, str] = os.environ,
    ) -> Tracing | None:
        """The server's tracing, or None when it is off; `process` names this process in
        every span's resource (server, engine, frontend); `hop_spans`: a request's hops as
        child spans rather than events."""
        if not wanted(trace_flag, environ):
            return None
        resource = Resource.create(
            {"service.name": environ.get("OTEL_SERVICE_NAME", "gradserve"),
             "gradserve.process": process, "process.pid": os.getpid()}
        )  # fmt: skip
        provider = TracerProvider(
            sampler=_LinkedToSampled(configured_sampler(environ)),
            resource=resource,
            shutdown_on_exit=False,
        )
        provider.add_span_processor(BatchSpanProcessor(_exporter(environ)))
        log.info("tracing on", extra={"event": "tracing", "role": process})
        return cls(provider, hop_spans)

    def close(self) -> None:
        """Export what is left and stop the exporter."""
        self._provider.shutdown()

    # -- requests ----------------------------------------------------------------------------

    def request(
        self,
        name: str,
        headers: Iterable[tuple[str, str | bytes]] | None,
        at: float,
        *,
        parent: trace.Span | None = None,
        attributes: Mapping[str, object] | None = None,
    ) -> trace.Span | None:
        """The span of one request that arrived at `at` (time.perf_counter()): in the trace
        its headers carry (gRPC metadata, HTTP headers), or a child of `parent` (a stream's
        message); None when it is not sampled."""
        if parent is not None:
            context = trace.set_span_in_context(parent)
            kind = SpanKind.INTERNAL
        else:
            context = propagate.extract(_carrier(headers or ()))
            kind = SpanKind.SERVER
        span = self._tracer.start_span(
            name, context, kind, attributes=attributes, start_time=wall_ns(at)
        )
        return span if span.is_recording() else None

    @staticmethod
    def described(span: trace.Span, attributes: Mapping[str, object]) -> None:
        """What the request turned out to be, once decoded (model, version, kind, rows)."""
        span.set_attributes(attributes)

    def answered(self, span: trace.Span, arrived: float, hops: Hops) -> None:
        """End a request span with its hops, one after the other, adding up to its time in
        the server as the answer's own breakdown does: as child spans, or (cheaper) as an
        event at each hop's start (a hop lasts until the next event, the last until the
        span's end)."""
        start = wall_ns(arrived)
        finish = start + hops.total_us * 1000
        context = trace.set_span_in_context(span) if self._hop_spans else None
        for hop, field in zip(HOPS, HOP_FIELDS, strict=True):
            end = finish if hop == HOPS[-1] else start + getattr(hops, field) * 1000
            if context is None:
                span.add_event(hop, timestamp=start)
            else:
                self._tracer.start_span(hop, context, start_time=start).end(end)
            start = end
        span.set_attributes({"gradserve.batch_rows": hops.batch_rows,
                             "gradserve.batches": len(getattr(span, "links", ()))})  # fmt: skip
        span.end(finish)

    @staticmethod
    def failed(span: trace.Span, code: str, message: str) -> None:
        """End a request span with its error status."""
        span.set_attribute("rpc.grpc.status_code_name", code)
        span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"))
        span.end()

    @staticmethod
    def ended(span: trace.Span, attributes: Mapping[str, object] | None = None) -> None:
        """End a span that needs nothing more (a stream's own span, once it closes)."""
        if attributes:
            span.set_attributes(attributes)
        span.end()

    # -- batches -----------------------------------------------------------------------------

    def batches(self, model: str, version: str) -> BatchSpans:
        """The batch watch of one model version's scheduler."""
        return BatchSpans(self._tracer, {"gradserve.model": model,
                                         "gradserve.model_version": version})  # fmt: skip


class BatchSpans:
    """Watches one scheduler's engine calls: a span per call that held a sampled request,
    linked to each such request's span, and each of those linked back to the batch. In the
    engine process a request is a frontend's sub-batch, traced by the contexts (Remote) of
    the requests it holds: the batch links to each, and nothing links back."""

    def __init__(self, tracer: trace.Tracer, attributes: dict[str, object]) -> None:
        self._tracer = tracer
        self._attributes = attributes

    def batch_done(
        self, parts: list[Part], dispatched: float, began: float, ended: float, split: float,
        error: BaseException | None,
    ) -> None:  # fmt: skip
        traced = [part for part in parts if part.pending.trace is not None]
        if not traced:
            return
        rows = sum(part.stop - part.start for part in parts)
        links = []  # without attributes: the link back from each request says which rows
        for part in traced:
            if isinstance(part.pending.trace, Remote):
                links += [Link(context) for context in part.pending.trace]
            else:
                links.append(Link(part.pending.trace.get_span_context()))
        attributes = {
            **self._attributes,
            "gradserve.derivative": parts[0].pending.kind.value,
            "gradserve.batch.rows": rows,
            "gradserve.batch.requests": len(parts),
            "gradserve.batch.traced_requests": len(traced),
        }
        span = self._tracer.start_span(
            "gradserve.batch", links=links, attributes=attributes, start_time=wall_ns(dispatched)
        )
        if error is None:
            span.add_event("engine.start", timestamp=wall_ns(began))
            span.add_event("engine.end", timestamp=wall_ns(ended))
        else:
            span.set_status(Status(StatusCode.ERROR, f"the engine call failed: {error}"))
        span.end(wall_ns(split))
        back = span.get_span_context()
        for part in traced:
            if isinstance(part.pending.trace, Remote):
                continue
            with contextlib.suppress(Exception):  # a request span ended meanwhile
                part.pending.trace.add_link(back, _part_attributes(part, rows))


def _part_attributes(part: Part, batch_rows: int) -> dict[str, int]:
    return {"gradserve.rows.start": part.start, "gradserve.rows.stop": part.stop,
            "gradserve.batch.rows": batch_rows}  # fmt: skip


def request_attributes(
    rpc: Sequence[str] | None, caller: str, extra: Mapping[str, object] | None = None
) -> dict[str, object]:
    """A request span's first attributes: the RPC (service, method) or none (REST), who calls."""
    attributes: dict[str, object] = {"gradserve.caller": caller}
    if rpc is not None:
        service, method = rpc
        attributes.update({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
    if extra:
        attributes.update(extra)
    return attributes
