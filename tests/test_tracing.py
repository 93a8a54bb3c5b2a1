"""OpenTelemetry tracing, collected by an OTLP receiver in the test: server spans in the
caller's trace with their hops, batch spans linked both ways to the requests they held,
stream messages, errors, explanations and split requests, sampling, tracing off, and spans
from every process of a multi-process server."""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import replace

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import (
    FRONTENDS_ARGS,
    TEST_CONFIG,
    GatedEngine,
    RunningServer,
    ServerProcess,
    free_port,
    wait_until,
)
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from otlp import Receiver, Span, tree
from test_statistics import POISON, RefusingEngine

from gradserve.client import AsyncGradientClient, GradientClient, GradserveError
from gradserve.server.tracing import configured_sampler, wanted
from gradserve.wire.timing import HOPS

MODEL = "quadratic"
EVALUATE = "gradserve.v1.GradientService/Evaluate"
MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
# The caller's own tracing: an SDK of its own, exporting nowhere.
CALLER = TracerProvider().get_tracer("caller")


@pytest.fixture
def receiver(monkeypatch):
    with Receiver() as running:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", running.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms
        monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
        yield running


@pytest.fixture
def traced(receiver, bundled_engine):
    config = replace(TEST_CONFIG, http_port=free_port())
    with RunningServer(config, RefusingEngine(bundled_engine)) as running:
        yield running, receiver


def _ids(span: trace.Span) -> tuple[str, str]:
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def _server_span(spans: list[Span], trace_id: str, name: str) -> Span:
    [span] = [s for s in spans if s.trace_id == trace_id and s.name == name]
    return span


def _children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start_ns)


def _batches_of(spans: list[Span], request: Span) -> list[Span]:
    """The batch spans linked to `request`."""
    return [s for s in spans if s.name == "gradserve.batch"
            and any(link[1] == request.span_id for link in s.links)]  # fmt: skip


def _check_hops(request: Span) -> None:
    """The request's hops are events at each hop's start, in order, from the span's start:
    each hop lasts until the next, the last until the span's end."""
    assert [name for name, _ in request.events] == list(HOPS)
    times = [at for _, at in request.events]
    assert times[0] == request.start_ns and times == sorted(times) and times[-1] <= request.end_ns


def _check_hop_spans(spans: list[Span], request: Span) -> None:
    """With --trace-hops spans: the hops are its children, one after the other, adding up to
    its span."""
    hops = _children(spans, request)
    assert [h.name for h in hops] == list(HOPS) and not request.events
    assert hops[0].start_ns == request.start_ns and hops[-1].end_ns == request.end_ns
    for before, after in itertools.pairwise(hops):
        assert before.end_ns == after.start_ns


def test_a_request_in_the_callers_trace_has_its_hops_and_its_batch(traced):
    running, receiver = traced
    with GradientClient(running.target) as client, CALLER.start_as_current_span("caller") as me:
        client.evaluate(np.linspace(0, 1, 3, dtype=np.float32).reshape(3, 1))
    trace_id, caller_id = _ids(me)
    spans = receiver.wait_for(lambda got: any(s.trace_id == trace_id for s in got))
    request = _server_span(spans, trace_id, EVALUATE)
    assert request.parent_id == caller_id and request.kind == "SERVER" and request.error is None
    attributes = request.attributes
    assert attributes["gradserve.model"] == MODEL and attributes["gradserve.model_version"] == "1"
    assert attributes["gradserve.derivative"] == "gradient" and attributes["gradserve.rows"] == 3
    assert attributes["rpc.service"] == "gradserve.v1.GradientService"
    assert attributes["gradserve.priority"] == "NORMAL" and attributes["gradserve.batches"] == 1
    assert request.resource["gradserve.process"] == "server"
    _check_hops(request)
    [batch] = _batches_of(spans, request)
    assert batch.trace_id != trace_id  # a batch is a trace of its own, linked to its requests
    assert batch.attributes["gradserve.batch.rows"] >= 3
    assert [name for name, _ in batch.events] == ["engine.start", "engine.end"]
    assert [(t, s) for t, s, _ in request.links] == [(batch.trace_id, batch.span_id)]
    print("\n" + tree(spans, request))
    print(tree(spans, batch))


def test_hops_as_child_spans(receiver, bundled_engine):
    config = replace(TEST_CONFIG, trace_hops="spans")
    with (
        RunningServer(config, bundled_engine) as running,
        GradientClient(running.target) as client,
        CALLER.start_as_current_span("caller") as me,
    ):
        client.evaluate(np.ones((2, 1), np.float32))
    trace_id = _ids(me)[0]
    spans = receiver.wait_for(lambda got: sum(s.trace_id == trace_id for s in got) == 6)
    _check_hop_spans(spans, _server_span(spans, trace_id, EVALUATE))


def test_one_batch_links_every_request_it_held(receiver, bundled_engine):
    gated = GatedEngine(bundled_engine)
    config = replace(TEST_CONFIG, max_batch_ms=0)  # the held call teaches no cost cap
    with RunningServer(config, gated) as running, GradientClient(running.target) as client:
        gated.gate.clear()
        blocker = threading.Thread(target=client.evaluate, args=(np.zeros((1, 1), np.float32),))
        blocker.start()
        wait_until(lambda: gated.entered == 1)  # the engine holds the first batch
        callers, threads = [], []
        for i in range(4):
            with CALLER.start_as_current_span(f"caller {i}") as span:
                x = np.full((2, 1), i, np.float32)
                context = trace.set_span_in_context(span)
                thread = threading.Thread(target=_evaluate_in, args=(client, x, context))
                thread.start()
            callers.append(_ids(span)[0])
            threads.append(thread)
        wait_until(lambda: running.batcher.queued_rows == 8)
        gated.gate.set()
        for thread in (blocker, *threads):
            thread.join(timeout=30)
    spans = receiver.spans()
    requests = [_server_span(spans, trace_id, EVALUATE) for trace_id in callers]
    [batch] = {b.span_id: b for r in requests for b in _batches_of(spans, r)}.values()
    assert sorted(link[1] for link in batch.links) == sorted(r.span_id for r in requests)
    assert batch.attributes["gradserve.batch.rows"] == 8
    for request in requests:
        assert [link[1] for link in request.links] == [batch.span_id]


def _evaluate_in(client: GradientClient, x: np.ndarray, context) -> None:
    token = trace.context_api.attach(context)
    try:
        client.evaluate(x)
    finally:
        trace.context_api.detach(token)


def test_each_stream_message_has_its_span(traced):
    running, receiver = traced

    async def stream() -> str:
        async with AsyncGradientClient(running.target) as client:
            with CALLER.start_as_current_span("streaming caller") as me:
                xs = [np.full((1, 1), i / 4, np.float32) for i in range(4)]
                answers = [r async for r in client.stream(xs)]
        assert len(answers) == 4
        return _ids(me)[0]

    trace_id = asyncio.run(stream())
    name = "gradserve.v1.GradientService/EvaluateStream"
    spans = receiver.wait_for(lambda got: sum(s.trace_id == trace_id for s in got) >= 1 + 4)
    call = _server_span(spans, trace_id, name)
    messages = _children(spans, call)
    assert [m.name for m in messages] == [f"{name} message"] * 4
    assert call.attributes["gradserve.stream.messages"] == 4
    for message in messages:
        _check_hops(message)
        assert _batches_of(spans, message)


def test_errors_set_the_span_status(traced):
    running, receiver = traced
    with GradientClient(running.target) as client:
        with CALLER.start_as_current_span("poisoned") as poisoned, pytest.raises(GradserveError):
            client.evaluate(np.array([[POISON]], np.float32))
        with CALLER.start_as_current_span("unknown") as unknown, pytest.raises(GradserveError):
            client.evaluate(np.zeros((1, 1), np.float32), model="nonesuch")
    spans = receiver.wait_for(
        lambda got: (
            {s.trace_id for s in got if s.name == EVALUATE} >= {_ids(poisoned)[0], _ids(unknown)[0]}
        )
    )
    failed = _server_span(spans, _ids(poisoned)[0], EVALUATE)
    assert failed.error.startswith("INTERNAL") and "poisoned row" in failed.error
    [batch] = _batches_of(spans, failed)  # the poisoned row's call alone, after the bisection
    assert "poisoned row" in batch.error
    refused = _server_span(spans, _ids(unknown)[0], EVALUATE)
    assert refused.error.startswith("NOT_FOUND") and "nonesuch" in refused.error
    assert refused.attributes["rpc.grpc.status_code_name"] == "NOT_FOUND"


def test_explanations_and_split_requests_show_as_such(traced):
    running, receiver = traced
    rows = TEST_CONFIG.max_batch_size * 2 + 10  # three batches
    with GradientClient(running.target) as client:
        with CALLER.start_as_current_span("explains") as explains:
            client.integrated_gradients(np.ones((2, 1), np.float32), steps=8)
        with CALLER.start_as_current_span("splits") as splits:
            client.evaluate(np.linspace(0, 1, rows, dtype=np.float32).reshape(rows, 1))
    wanted = {_ids(explains)[0], _ids(splits)[0]}
    spans = receiver.wait_for(lambda got: {s.trace_id for s in got if s.name == EVALUATE} >= wanted)
    explained = _server_span(spans, _ids(explains)[0], EVALUATE)
    assert explained.attributes["gradserve.rows"] == 2
    assert explained.attributes["gradserve.queued_rows"] == 2 * 9
    assert "integrated gradients" in explained.attributes["gradserve.expansion"]
    split = _server_span(spans, _ids(splits)[0], EVALUATE)
    batches = split.attributes["gradserve.batches"]
    assert batches >= 3 and len(split.links) == batches
    spans = receiver.wait_for(lambda got: len(_batches_of(got, split)) == batches)
    parts = sorted((a["gradserve.rows.start"], a["gradserve.rows.stop"]) for *_, a in split.links)
    assert parts[0][0] == 0 and parts[-1][1] == rows  # the batches hold the rows, in turn
    assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(parts))


def test_the_standard_protocols_read_traceparent(traced):
    running, receiver = traced
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    traceparent = {"traceparent": f"00-{trace_id}-{parent}-01"}
    x = np.ones((1, 1), np.float32)
    with grpcclient.InferenceServerClient(running.target) as client:
        tensor = grpcclient.InferInput("x", [1, 1], "FP32")
        tensor.set_data_from_numpy(x)
        client.infer(MODEL, [tensor], headers=traceparent)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}
    url = f"http://127.0.0.1:{running.server.http_port}/v2/models/{MODEL}/infer"
    assert httpx.post(url, json=body, headers=traceparent, timeout=30).status_code == 200
    rest = "POST /v2/models/{model}/infer"
    spans = receiver.wait_for(
        lambda got: {s.name for s in got if s.trace_id == trace_id} >= {MODEL_INFER, rest}
    )
    for name in (MODEL_INFER, rest):
        span = _server_span(spans, trace_id, name)
        assert span.parent_id == parent and span.kind == "SERVER"
        assert span.attributes["gradserve.model"] == MODEL


def test_sampling_follows_the_standard_settings(receiver, bundled_engine, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    with RunningServer(TEST_CONFIG, bundled_engine) as running:
        assert running.server.tracing is not None
        with GradientClient(running.target) as client:
            for _ in range(5):
                client.evaluate(np.ones((1, 1), np.float32))
    assert receiver.spans() == []  # stopping the server exported what there was


def test_tracing_off_exports_nothing_and_makes_no_span(bundled_engine, monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    with Receiver() as receiver, RunningServer(TEST_CONFIG, bundled_engine) as running:
        assert running.server.tracing is None
        with GradientClient(running.target) as client, CALLER.start_as_current_span("caller"):
            client.evaluate(np.ones((1, 1), np.float32))
    assert receiver.spans() == []


def test_every_process_of_a_multi_process_server_names_itself(receiver):
    """Frontends' spans name their frontend; the engine process's batch spans link to the
    requests of every sub-batch they merged."""
    running = ServerProcess(*FRONTENDS_ARGS, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint,
                            OTEL_BSP_SCHEDULE_DELAY="50")  # fmt: skip
    try:
        callers = []
        for i in range(40):  # new connections: both frontends answer some
            with (
                GradientClient(running.target) as client,
                CALLER.start_as_current_span(f"caller {i}") as span,
            ):
                client.evaluate(np.ones((1, 1), np.float32))
            callers.append(_ids(span)[0])
            processes = {s.resource["gradserve.process"] for s in receiver.spans()
                         if s.name == EVALUATE}  # fmt: skip
            if len(processes) == 2:
                break
    finally:
        assert running.stop() == 0
    spans = receiver.spans()
    requests = [s for s in spans if s.name == EVALUATE]
    assert {r.resource["gradserve.process"] for r in requests} == {"frontend-0", "frontend-1"}
    assert len({r.resource["process.pid"] for r in requests}) == 2
    spans = receiver.wait_for(lambda got: all(len(_batches_of(got, r)) == 2 for r in requests))
    for request in requests:  # the frontend's sub-batch, and the engine process's call
        mine, engine = sorted(_batches_of(spans, request), key=lambda b: b.start_ns)
        assert mine.resource["process.pid"] == request.resource["process.pid"]
        assert engine.resource["gradserve.process"] == "engine"
        assert [link[1] for link in request.links] == [mine.span_id]


def test_tracing_is_configured_by_the_standard_variables():
    assert not wanted(False, {}) and wanted(True, {})
    assert wanted(False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert wanted(False, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})
    assert not wanted(True, {"OTEL_SDK_DISABLED": "true"})
    assert not wanted(True, {"OTEL_TRACES_EXPORTER": "none"})
    assert configured_sampler({}).get_description().startswith("ParentBased{root:AlwaysOnSampler")
    ratio = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    assert "0.25" in configured_sampler(ratio).get_description()
    with pytest.raises(ValueError, match="expected one of always_on"):
        configured_sampler({"OTEL_TRACES_SAMPLER": "sometimes"})
    with pytest.raises(ValueError, match=r"expected a ratio in \[0, 1\]"):
        configured_sampler({**ratio, "OTEL_TRACES_SAMPLER_ARG": "2"})
