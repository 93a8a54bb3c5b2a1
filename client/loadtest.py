"""`gradserve loadtest`: offered load at several concurrencies, latency and throughput per step.

Unary mode runs C callers, each sending its next request when the last one is answered.
Stream mode opens C streams, each keeping up to --window messages in flight. Per step it
prints requests/s, rows/s, latency percentiles, errors by status code, the server-side
batch sizes the responses report, and where a request's time went: the client's latency
split into the server's hops (decode, queue, handoff, compute, encode; medians) and the
rest, "outside" (the network, gRPC and the client itself). Bounded: every step stops after
--duration seconds or --requests requests, whichever comes first. Imports neither TensorFlow
nor the server.

Requests are built by the SDK's own `make_request` from the served model's shapes (any
per-row input shape, `v` for vjp, jvp and hvp), from random rows or from a .npy file.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from gradserve.client.channel import DEFAULT_TARGET, Tls, open_channel
from gradserve.client.results import ModelInfo, kind_of, make_request, to_model_info
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.kinds import Derivative
from gradserve.wire.status import status_code
from gradserve.wire.timing import HOPS

PERCENTILES = (50, 90, 95, 99)
BREAKDOWN = (*HOPS, "server", "outside")  # the server's hops, its total, and the rest
_HOP_FIELDS = (*(f"{hop}_us" for hop in HOPS), "total_us")  # what each answer's hops hold
KINDS = tuple(kind.value for kind in Derivative)
MAX_DISTINCT_REQUESTS = 256  # requests cut from an --x-file, reused in turn


@dataclass
class StepResult:
    """One (mode, concurrency) step: counts, throughput, latency in ms, batch sizes seen."""

    label: str
    mode: str
    concurrency: int
    rows_per_request: int
    seconds: float
    requests: int
    errors: dict[str, int]
    requests_per_s: float
    rows_per_s: float
    latency_ms: dict[str, float]
    batch_rows: dict[str, float]
    breakdown_us: dict[str, float] = field(default_factory=dict)  # hop -> median us
    derivative: str = "gradient"
    model: str = ""

    def unexpected_errors(self, expected: set[str] = frozenset()) -> int:
        return sum(n for code, n in self.errors.items() if code not in expected)


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)
    hops: list[tuple[int, ...]] = field(default_factory=list)  # per answer: _HOP_FIELDS
    errors: Counter = field(default_factory=Counter)
    done: int = 0

    def ok(self, seconds: float, response: pb.EvaluateResponse) -> None:
        if response.HasField("error"):
            self.failed_named(status_code(response.error.code).name)
            return
        t = response.timing
        self.answered(seconds, t.batch_rows, tuple(getattr(t, name) for name in _HOP_FIELDS))

    def answered(self, seconds: float, batch_rows: int, hops: tuple[int, ...]) -> None:
        """One answer: its latency, its batch's rows, its hops (in _HOP_FIELDS' order)."""
        self.done += 1
        self.latencies.append(seconds)
        self.batch_rows.append(batch_rows)
        self.hops.append(hops)

    def failed(self, code: grpc.StatusCode) -> None:
        self.failed_named(code.name)

    def failed_named(self, name: str) -> None:
        self.done += 1
        self.errors[name] += 1


def build_requests(
    info: ModelInfo,
    rows: int,
    derivative: str,
    x: np.ndarray | None = None,
    model: str = "",
    seed: int = 0,
) -> list[pb.EvaluateRequest]:
    """Requests of `rows` rows each for the model `info` describes, through the SDK's
    make_request: random inputs in [0, 1), or consecutive slices of `x` ([N, *input_shape],
    at most MAX_DISTINCT_REQUESTS of them); `v` (random) for the kinds that need it."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(info.dtype)
    if x is None:
        xs = [rng.uniform(0, 1, size=(rows, *info.input_shape)).astype(dtype)]
    else:
        check_inputs(x, info, rows)
        count = min(len(x) // rows, MAX_DISTINCT_REQUESTS)
        xs = [x[i * rows : (i + 1) * rows] for i in range(count)]
    requests = []
    for batch in xs:
        v = None
        if derivative == "vjp":
            v = rng.standard_normal((rows, *info.output_shape)).astype(dtype)
        elif kind_of(derivative).needs_vector:
            v = rng.standard_normal((rows, *info.input_shape)).astype(dtype)
        requests.append(make_request(batch, derivative, model=model, v=v))
    return requests


def check_inputs(x: np.ndarray, info: ModelInfo, rows: int) -> None:
    """Raise ValueError unless x is [N >= rows, *input_shape] of real numbers."""
    if tuple(x.shape[1:]) != tuple(info.input_shape) or x.ndim != len(info.input_shape) + 1:
        raise ValueError(
            f"--x-file holds shape {list(x.shape)}; model {info.name!r} takes "
            f"[N, {', '.join(map(str, info.input_shape))}]"
        )
    if len(x) < rows:
        raise ValueError(f"--x-file has {len(x)} rows, fewer than --rows {rows}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"--x-file must hold numbers, not {x.dtype}")


def load_inputs(path: Path) -> np.ndarray:
    """Rows from a .npy file (no pickles), as float32 unless stored as float64."""
    x = np.load(path, allow_pickle=False)
    return x if x.dtype == np.float64 else x.astype(np.float32)


class _Clock:
    """The step's stopping rule: a deadline and a request budget shared by all workers."""

    def __init__(self, duration: float, max_requests: int | None) -> None:
        self.end = time.perf_counter() + duration
        self.remaining = max_requests if max_requests else sys.maxsize

    def take(self) -> bool:
        if self.remaining <= 0 or time.perf_counter() >= self.end:
            return False
        self.remaining -= 1
        return True


async def _unary_worker(
    stub, requests: list[pb.EvaluateRequest], clock: _Clock, tally: _Tally, timeout: float
) -> None:
    sent = 0
    while clock.take():
        request = requests[sent % len(requests)]
        sent += 1
        started = time.perf_counter()
        try:
            response = await stub.Evaluate(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            tally.failed(error.code())
            continue
        tally.ok(time.perf_counter() - started, response)


async def _stream_worker(
    stub,
    requests: list[pb.EvaluateRequest],
    clock: _Clock,
    tally: _Tally,
    window: int,
    timeout: float,
) -> None:
    """One stream with up to `window` messages in flight; latency is send -> answer."""
    sent: dict[str, float] = {}
    slots = asyncio.Semaphore(window)

    async def messages():
        i = 0
        while True:
            await slots.acquire()
            if not clock.take():
                return
            message = pb.EvaluateRequest()
            message.CopyFrom(requests[i % len(requests)])
            message.id = str(i)
            sent[message.id] = time.perf_counter()
            i += 1
            yield message

    call = stub.EvaluateStream(messages(), timeout=timeout)
    try:
        async for response in call:
            tally.ok(time.perf_counter() - sent.pop(response.id), response)
            slots.release()
    except grpc.aio.AioRpcError as error:
        for _ in sent:
            tally.failed(error.code())


async def run_step(
    targets: list[str],
    *,
    mode: str,
    concurrency: int,
    rows: int,
    duration: float,
    max_requests: int | None = None,
    derivative: str = "gradient",
    window: int = 16,
    timeout: float = 30.0,
    label: str = "",
    progress: bool = False,
    tls: Tls | None = None,
    connections: int | None = None,
    model: str = "",
    x: np.ndarray | None = None,
    request: pb.EvaluateRequest | None = None,
    protocol: str = "native",
    http_data: str = "binary",
) -> StepResult:
    """Run one load step and summarise it; callers are spread round-robin over `connections`
    connections to each of `targets` (default: one per caller, at most 16).

    The request shapes come from the server's description of `model` (empty: the only one
    served); `x` ([N, *input_shape]) replaces the random inputs; `request` (e.g. an
    explanation with its options) replaces them all, `rows` then being its row count.
    `protocol` "rest": unary steps over HTTP (targets are HTTP host:port), the tensors in
    `http_data` (binary or json)."""
    connections = connections or min(concurrency, 16)
    if protocol == "rest":
        if mode != "unary":
            raise ValueError("--protocol rest runs unary steps only: HTTP has no streams")
        requests = {"concurrency": concurrency, "rows": rows, "derivative": derivative,
                    "model": model, "x": x, "http_data": http_data}  # fmt: skip
        tally, seconds, name = await _rest_step(
            targets, _Clock(duration, max_requests), timeout, tls, connections, label, progress,
            **requests,
        )  # fmt: skip
        result = _summarise(tally, label, mode, concurrency, rows, seconds)
        return replace(result, derivative=derivative, model=name)
    channels = [open_channel(t, tls, aio=True) for t in targets for _ in range(connections)]
    try:
        stubs = [pb_grpc.GradientServiceStub(c) for c in channels]
        info = await stubs[0].GetModelInfo(pb.ModelInfoRequest(model=model), timeout=timeout)
        if request is not None:
            requests = [request]
        else:
            requests = build_requests(to_model_info(info), rows, derivative, x, model)
        clock, tally = _Clock(duration, max_requests), _Tally()
        workers = [
            _unary_worker(stubs[i % len(stubs)], requests, clock, tally, timeout)
            if mode == "unary"
            else _stream_worker(stubs[i % len(stubs)], requests, clock, tally, window, timeout)
            for i in range(concurrency)
        ]
        seconds = await _timed(workers, tally, clock, label, progress)
    finally:
        for channel in channels:
            await channel.close()
    result = _summarise(tally, label, mode, concurrency, rows, seconds)
    return replace(result, derivative=derivative, model=info.name)


async def _rest_step(
    targets: list[str],
    clock: _Clock,
    timeout: float,
    tls: Tls | None,
    connections: int,
    label: str,
    progress: bool,
    *,
    concurrency: int,
    rows: int,
    derivative: str,
    model: str,
    x: np.ndarray | None,
    http_data: str,
) -> tuple[_Tally, float, str]:
    """One unary step over HTTP: the tally, its seconds, the model's name."""
    from gradserve.client import rest_load

    context = None if tls is None else tls.ssl_context()
    callers = [rest_load.RestCaller(t, connections, timeout, context) for t in targets]
    try:
        first = callers[0]
        name = await rest_load.model_name(first.session, first.base, model, timeout)
        shapes = await rest_load.model_shapes(first.session, first.base, name, timeout)
        info = ModelInfo(name, "", 0, 0, KINDS, "", 0, 0, *shapes)
        bodies = [rest_load.rest_body(r, http_data)
                  for r in build_requests(info, rows, derivative, x)]  # fmt: skip
        tally = _Tally()

        async def worker(caller) -> None:
            url, sent = f"{caller.base}/v2/models/{name}/infer", 0
            while clock.take():
                body, headers = bodies[sent % len(bodies)]
                sent += 1
                await caller.call(url, body, headers, tally)

        workers = [worker(callers[i % len(callers)]) for i in range(concurrency)]
        seconds = await _timed(workers, tally, clock, label, progress)
    finally:
        for caller in callers:
            await caller.close()
    return tally, seconds, name


async def _timed(workers: list, tally: _Tally, clock: _Clock, label: str, progress: bool) -> float:
    """Run the step's workers to the end, with the live progress bar if asked; its seconds."""
    started = time.perf_counter()
    reporter = asyncio.create_task(_report(tally, clock, started, label)) if progress else None
    await asyncio.gather(*workers)
    if reporter:
        reporter.cancel()
        print(file=sys.stderr)
    return time.perf_counter() - started


async def _report(tally: _Tally, clock: _Clock, started: float, label: str) -> None:
    """A live progress bar on stderr for the running step."""
    total = clock.end - started
    while True:
        elapsed = time.perf_counter() - started
        filled = int(30 * min(elapsed / total, 1.0))
        rate = tally.done / elapsed if elapsed else 0.0
        bar = "#" * filled + "." * (30 - filled)
        sys.stderr.write(f"\r  {label:<24} [{bar}] {tally.done:>8} req {rate:>9.0f}/s")
        sys.stderr.flush()
        await asyncio.sleep(0.2)


def _summarise(tally: _Tally, label, mode, concurrency, rows, seconds) -> StepResult:
    latencies = np.array(tally.latencies) * 1e3
    batches = np.array(tally.batch_rows)
    ok = len(latencies)
    latency = {f"p{p}": float(np.percentile(latencies, p)) if ok else 0.0 for p in PERCENTILES}
    latency["max"] = float(latencies.max()) if ok else 0.0
    batch = {
        "mean": float(batches.mean()) if ok else 0.0,
        "p50": float(np.percentile(batches, 50)) if ok else 0.0,
        "max": float(batches.max()) if ok else 0.0,
    }
    return StepResult(
        breakdown_us=_breakdown(tally, latencies),
        label=label,
        mode=mode,
        concurrency=concurrency,
        rows_per_request=rows,
        seconds=seconds,
        requests=tally.done,
        errors=dict(tally.errors),
        requests_per_s=ok / seconds,
        rows_per_s=ok * rows / seconds,
        latency_ms=latency,
        batch_rows=batch,
    )


def _breakdown(tally: _Tally, latencies_ms: np.ndarray) -> dict[str, float]:
    """Median of each server hop, of the server's total and of the time outside the server
    (client latency minus server total, per request), in microseconds."""
    if not tally.hops:
        return {}
    hops = np.array(tally.hops, dtype=float)
    medians = dict(zip((*HOPS, "server"), np.median(hops, axis=0).tolist(), strict=True))
    medians["outside"] = float(np.median(latencies_ms * 1e3 - hops[:, -1]))
    return medians


def format_breakdown(results: list[StepResult]) -> str:
    """Where a request's time went, per step: the server's hops and the rest (medians, us)."""
    columns = BREAKDOWN
    head = f"{'run':<16} {'mode':<6} {'conc':>5} {'rows':>5} " + " ".join(
        f"{c:>8}" for c in columns
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if r.breakdown_us:
            cells = " ".join(f"{r.breakdown_us[c]:>8.0f}" for c in columns)
            lines.append(
                f"{r.label:<16} {r.mode:<6} {r.concurrency:>5} {r.rows_per_request:>5} {cells}"
            )
    return "\n".join(lines)


def format_table(results: list[StepResult]) -> str:
    head = (
        f"{'run':<16} {'mode':<6} {'kind':<8} {'conc':>5} {'rows':>5} {'req/s':>9} {'rows/s':>10} "
        + " ".join(f"{'p' + str(p):>7}" for p in PERCENTILES)
        + f" {'max':>7} {'batch':>6} {'errors'}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lat = " ".join(f"{r.latency_ms[f'p{p}']:>7.2f}" for p in PERCENTILES)
        errors = ",".join(f"{k}={v}" for k, v in sorted(r.errors.items())) or "-"
        lines.append(
            f"{r.label:<16} {r.mode:<6} {r.derivative:<8} {r.concurrency:>5} "
            f"{r.rows_per_request:>5} {r.requests_per_s:>9.0f} {r.rows_per_s:>10.0f} {lat} "
            f"{r.latency_ms['max']:>7.2f} {r.batch_rows['mean']:>6.1f} {errors}"
        )
    return "\n".join(lines)


def write_json(results: list[StepResult], path: Path) -> None:
    path.write_text(json.dumps([asdict(r) for r in results], indent=2))


def write_csv(results: list[StepResult], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["label", "mode", "concurrency", "rows", "seconds", "requests", "errors", "req_per_s",
             "rows_per_s", *[f"p{p}_ms" for p in PERCENTILES], "max_ms", "batch_mean",
             "derivative", "model", *[f"{h}_us" for h in BREAKDOWN]]
        )  # fmt: skip
        for r in results:
            writer.writerow(
                [r.label, r.mode, r.concurrency, r.rows_per_request, f"{r.seconds:.3f}",
                 r.requests, sum(r.errors.values()), f"{r.requests_per_s:.1f}",
                 f"{r.rows_per_s:.1f}", *[f"{r.latency_ms[f'p{p}']:.3f}" for p in PERCENTILES],
                 f"{r.latency_ms['max']:.3f}", f"{r.batch_rows['mean']:.2f}", r.derivative,
                 r.model, *[f"{r.breakdown_us.get(h, 0.0):.0f}" for h in BREAKDOWN]]
            )  # fmt: skip


def plot(results: list[StepResult], path: Path, title: str = "gradserve load test") -> None:
    """Throughput (rows/s) against p99 latency: one point per concurrency, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    runs: dict[str, list[StepResult]] = {}
    for r in results:
        runs.setdefault(f"{r.label} {r.mode} {r.derivative} {r.rows_per_request} row", []).append(r)
    for name, steps in runs.items():
        steps.sort(key=lambda s: s.concurrency)
        xs = [s.latency_ms["p99"] for s in steps]
        ys = [s.rows_per_s for s in steps]
        ax.plot(xs, ys, marker="o", label=name)
        for s, x, y in zip(steps, xs, ys, strict=True):
            ax.annotate(f"c={s.concurrency}", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("rows/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", action="append", help=f"server address (repeatable; default {DEFAULT_TARGET})"
    )
    parser.add_argument(
        "--protocol", choices=("native", "rest"), default="native",
        help="native: gradserve's gRPC service; rest: the standard protocol over HTTP/JSON "
        "(targets are the HTTP port, e.g. 127.0.0.1:8000; unary only)",
    )  # fmt: skip
    parser.add_argument(
        "--http-data", choices=("binary", "json"), default="binary",
        help="with --protocol rest: tensors in the binary extension or as JSON numbers",
    )  # fmt: skip
    parser.add_argument("--mode", choices=("unary", "stream"), default="unary")
    parser.add_argument(
        "--concurrency", default="1,8,64", help="comma list: callers (unary) or streams"
    )
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per step")
    parser.add_argument(
        "--requests", type=int, default=None, help="stop a step after this many requests"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of unrecorded load before each step"
    )
    parser.add_argument(
        "--derivative",
        type=_kinds,
        default=["gradient"],
        help=f"kind, comma list of kinds, or 'all' ({', '.join(KINDS)}); one set of steps per kind",
    )
    parser.add_argument("--model", default="", help="model to call (empty: the only one served)")
    parser.add_argument(
        "--x-file",
        type=Path,
        help="send these inputs: a .npy array [N, *input_shape]; each request takes the next "
        "--rows rows (default: random rows in [0, 1))",
    )
    parser.add_argument("--window", type=int, default=16, help="messages in flight per stream")
    parser.add_argument(
        "--connections", type=int, default=None,
        help="connections per target (default: one per caller, at most 16)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call (s)")
    parser.add_argument("--label", default="gradserve", help="name of this run in tables and plots")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--csv", type=Path, help="write the results as CSV")
    parser.add_argument(
        "--plot", type=Path, help="write throughput vs p99 latency as PNG (needs matplotlib)"
    )
    parser.add_argument("--expect", default="", help="status codes not counted as failures")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    parser.add_argument("--tls-ca", help="PEM CA to verify a TLS server (turns TLS on)")
    parser.add_argument("--tls-cert", help="PEM client certificate, for mTLS")
    parser.add_argument("--tls-key", help="PEM client key, for mTLS")


def _kinds(text: str) -> list[str]:
    """--derivative: one kind, a comma list, or 'all'."""
    if text.strip().lower() == "all":
        return list(KINDS)
    kinds = [k.strip().lower() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown derivative {', '.join(unknown) or text!r}; choose from "
            f"{', '.join(KINDS)} or all"
        )
    return kinds


async def run(args: argparse.Namespace) -> list[StepResult]:
    targets = args.target or [DEFAULT_TARGET]
    x = load_inputs(args.x_file) if args.x_file else None
    kinds = args.derivative if isinstance(args.derivative, list) else _kinds(args.derivative)
    results = []
    steps = [(k, int(c)) for k in kinds for c in str(args.concurrency).split(",")]
    for derivative, concurrency in steps:
        common = {
            "mode": args.mode,
            "concurrency": concurrency,
            "rows": args.rows,
            "derivative": derivative,
            "window": args.window,
            "timeout": args.timeout,
            "tls": _tls(args),
            "connections": args.connections,
            "model": args.model,
            "x": x,
            "protocol": args.protocol,
            "http_data": args.http_data,
        }
        if args.warmup > 0:
            await run_step(targets, duration=args.warmup, **common)
        results.append(
            await run_step(
                targets, duration=args.duration, max_requests=args.requests, label=args.label,
                progress=not args.no_progress and sys.stderr.isatty(), **common,
            )
        )  # fmt: skip
    return results


def _tls(args: argparse.Namespace) -> Tls | None:
    if not (args.tls_ca or args.tls_cert):
        return None
    return Tls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def main(args: argparse.Namespace) -> int:
    """Run every step, print the table, write the files; exit 1 if any request failed."""
    try:
        results = asyncio.run(run(args))
    except grpc.aio.AioRpcError as error:
        print(f"cannot reach the server: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"gradserve loadtest: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    print("\nwhere the time went (medians, microseconds):")
    print(format_breakdown(results))
    if args.json:
        write_json(results, args.json)
    if args.csv:
        write_csv(results, args.csv)
    if args.plot:
        plot(results, args.plot)
    expected = {c.strip().upper() for c in args.expect.split(",") if c.strip()}
    failed = sum(r.unexpected_errors(expected) for r in results)
    if failed:
        print(f"{failed} request(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="gradserve loadtest", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
