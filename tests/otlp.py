"""An OTLP/gRPC trace receiver for the tests: the OpenTelemetry collector's TraceService,
served with grpcio on a free 127.0.0.1 port, keeping every span it is sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status


def _value(value: AnyValue) -> object:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def _attributes(pairs) -> dict[str, object]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class Span:
    """One received span, in plain Python (ids as hex)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, object]
    links: list[tuple[str, str, dict[str, object]]]  # (trace id, span id, attributes)
    events: list[tuple[str, int]]  # (name, epoch ns)
    error: str | None  # the status message, when the status is ERROR
    resource: dict[str, object]

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


def _link(link: SpanProto.Link) -> tuple[str, str, dict[str, object]]:
    return link.trace_id.hex(), link.span_id.hex(), _attributes(link.attributes)


def _link(link: SpanProto.Link) -> tuple[str, str, dict[str, object]]:
    return link.trace_id.hex(), link.span_id.hex(), _attributes(link.attributes)


def _span(proto: SpanProto, resource: dict[str, object]) -> Span:
    error = proto.status.message if proto.status.code == Status.STATUS_CODE_ERROR else None
    return Span(
        name=proto.name,
        trace_id=proto.trace_id.hex(),
        span_id=proto.span_id.hex(),
        parent_id=proto.parent_span_id.hex(),
        kind=SpanProto.SpanKind.Name(proto.kind).removeprefix("SPAN_KIND_"),
        start_ns=proto.start_time_unix_nano,
        end_ns=proto.end_time_unix_nano,
        attributes=_attributes(proto.attributes),
        links=[_link(link) for link in proto.links],
        events=[(event.name, event.time_unix_nano) for event in proto.events],
        error=error,
        resource=resource,
    )


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Use as `with Receiver() as receiver:`; `endpoint` is what OTLP exporters are given."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self._server = grpc.server(ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"

    def Export(self, request, context) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                received += [_span(span, resource) for span in scope_spans.spans]
        with self._lock:
            self._spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, found: Callable[[list[Span]], bool], timeout: float = 20.0) -> list[Span]:
        """Every span received, once `found` holds for them (AssertionError at `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.spans()
            if found(spans):
                return spans
            time.sleep(0.05)
        raise AssertionError(f"spans never matched; received {[s.name for s in self.spans()]}")

    def __enter__(self) -> Receiver:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=1).wait(5)


def tree(spans: list[Span], root: Span) -> str:
    """A trace as text: each span under its parent with its duration, process, links and
    events (at their offset from the span's start)."""
    children: dict[str, list[Span]] = {}
    for span in spans:
        children.setdefault(span.parent_id, []).append(span)
    lines: list[str] = []

    def show(span: Span, depth: int) -> None:
        indent = "  " * depth
        process = span.resource.get("gradserve.process", "")
        links = f"  links: {len(span.links)}" if span.links else ""
        lines.append(f"{indent}{span.name}  {span.duration_ns / 1e3:.0f} us  "
                     f"[{process}]{links}")  # fmt: skip
        for name, at in span.events:
            lines.append(f"{indent}  - {name} at +{(at - span.start_ns) / 1e3:.0f} us")
        for child in sorted(children.get(span.span_id, []), key=lambda s: s.start_ns):
            show(child, depth + 1)

    show(root, 0)
    return "\n".join(lines)
