"""`make bench`: engine ceiling, transport ceiling, gradserve unbatched and batched,
integrated gradients over one stream, and the flood (fairness and memory bounds), in ONE
run. `--only flood` runs the flood step alone and `--only-explain` the integrated-gradients
step (printed, not written).

Writes the generated part of docs/benchmarks.md (between the bench markers; the tuning log
around it is kept) and docs/benchmarks.png. Numbers are medians over repeats; the ratios
compare measurements from this same run, since the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import loadtest
from gradserve.client.loadtest import StepResult
from gradserve.client.results import make_request

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks.png"
SERVE = ["-m", "gradserve.server.cli", "serve"]
SIDE_PORTS_OFF = ["--metrics-port", "0", "--http-port", "0"]  # metrics and REST: not measured
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

UNARY = [("unary", c, 1) for c in (1, 16, 64)]
FRONTENDS = 2
STREAMS = [("stream", c, rows) for c in (1, 8) for rows in (1, 256)] + [("stream", 16, 1)]
IG_ROWS, IG_STEPS = 16, 64  # integrated gradients: rows per message, quadrature intervals
# Messages in flight on the stream: each expands to 1040 rows, and the queue bound counts
# expanded rows, so 256 in flight (the server's default read-ahead) would fill the queue.
IG_WINDOW = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess, its readiness wait, and its peak RSS sampled every 0.2 s."""

    def __init__(self, label: str, argv: list[str], health: bool) -> None:
        self.label, self.port = label, free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, *argv, "--port", str(self.port)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        threading.Thread(target=self._sample_rss, daemon=True).start()
        self._wait_ready(health)

    def rss_mb(self) -> float:
        """The server's resident memory now (0 once it has exited)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0.0
        line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_rss_mb = max(self.peak_rss_mb, self.rss_mb())

    def _wait_ready(self, health: bool, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            while time.monotonic() < end:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.label} exited: {self.process.stderr.read()}")
                try:
                    if health:
                        check = health_pb2_grpc.HealthStub(channel).Check
                        if check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                            return
                    else:
                        grpc.channel_ready_future(channel).result(timeout=1)
                        return
                except (grpc.RpcError, grpc.FutureTimeoutError):
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"{self.label} did not become ready")

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def measure(server: Server, steps, repeats: int, seconds: float) -> list[StepResult]:
    """Median over repeats for each step (warm-up first), one StepResult per step."""
    results = []
    for mode, concurrency, rows in steps:
        common = {"mode": mode, "concurrency": concurrency, "rows": rows, "window": 16}
        asyncio.run(loadtest.run_step([server.target], duration=0.5, **common))
        runs = [
            asyncio.run(
                loadtest.run_step([server.target], duration=seconds, label=server.label, **common)
            )
            for _ in range(repeats)
        ]
        results.append(_median(runs))
        print(f"  {server.label:<12} {mode:<6} c={concurrency:<3} rows={rows:<4} "
              f"{results[-1].rows_per_s:>10.0f} rows/s  p50 {results[-1].latency_ms['p50']:.2f} ms",
              flush=True)  # fmt: skip
    return results


def _median(runs: list[StepResult]) -> StepResult:
    def med(get):
        return statistics.median(get(r) for r in runs)

    errors: dict[str, int] = {}
    for r in runs:
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
    return replace(
        runs[0],
        seconds=sum(r.seconds for r in runs),
        requests=sum(r.requests for r in runs),
        errors=errors,
        requests_per_s=med(lambda r: r.requests_per_s),
        rows_per_s=med(lambda r: r.rows_per_s),
        latency_ms={k: med(lambda r, k=k: r.latency_ms[k]) for k in runs[0].latency_ms},
        batch_rows={k: med(lambda r, k=k: r.batch_rows[k]) for k in runs[0].batch_rows},
        breakdown_us={k: med(lambda r, k=k: r.breakdown_us[k]) for k in runs[0].breakdown_us},
    )


def integrated_gradients(server: Server, repeats: int, seconds: float) -> dict:
    """Integrated gradients of IG_ROWS rows x IG_STEPS steps per message over one stream
    (IG_WINDOW messages in flight), median over repeats: path rows per second, counting
    IG_STEPS + 1 path rows per row (every row the engine computes)."""
    x = np.random.default_rng(0).uniform(0, 1, (IG_ROWS, 1)).astype(np.float32)
    request = make_request(x, "integrated_gradients", steps=IG_STEPS)
    step = {"mode": "stream", "concurrency": 1, "rows": IG_ROWS, "window": IG_WINDOW,
            "request": request}  # fmt: skip
    asyncio.run(loadtest.run_step([server.target], duration=0.5, **step))
    runs = [
        asyncio.run(loadtest.run_step([server.target], duration=seconds, label="ig", **step))
        for _ in range(repeats)
    ]
    result = _median(runs)
    if result.unexpected_errors():
        raise RuntimeError(f"integrated gradients failed: {result.errors}")
    rate = result.rows_per_s * (IG_STEPS + 1)
    print(f"  {server.label:<12} integrated gradients {IG_ROWS} rows x {IG_STEPS} steps, 1 "
          f"stream: {rate:,.0f} path rows/s, mean batch {result.batch_rows['mean']:.0f}",
          flush=True)  # fmt: skip
    return {"rows": IG_ROWS, "steps": IG_STEPS, "path_rows_per_s": rate,
            "messages": result.requests, "mean_batch": result.batch_rows["mean"],
            "p50_ms": result.latency_ms["p50"]}  # fmt: skip


def engine_ceiling(repeats: int, *extra: str) -> list[dict]:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine_ceiling.py"), "--repeats", str(repeats),
         *extra],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(run.stdout.strip().splitlines()[-1])


FLOOD_CALLERS, FLOOD_ROWS, FLOOD_SECONDS, FLOOD_REPEATS = 40, 300, 10.0, 3
# Fairness and the time cap on (as by default), then both off: the flooders' rows/s compared.
FLOOD_CONFIGS = {
    "fair": ["--fairness", "on", "--max-batch-ms", "20"],
    "fifo": ["--fairness", "off", "--max-batch-ms", "0"],
    f"fair, frontends={FRONTENDS}": ["--frontends", str(FRONTENDS), "--fairness", "on",
                                     "--max-batch-ms", "20"],
}  # fmt: skip


def flood_step(rounds: int = FLOOD_REPEATS) -> dict:
    """The flood (40 callers x 300-row requests of a 64x64x3 model, plus one 1-row caller)
    against each of FLOOD_CONFIGS, `rounds` rounds alternating them: each one's medians."""
    import tempfile

    from bench.flood import QUEUE_MB, build_model, median_of, run_flood

    runs: dict[str, list] = {label: [] for label in FLOOD_CONFIGS}
    with tempfile.TemporaryDirectory() as folder:
        model = build_model(Path(folder) / "head64x64x3.keras")
        for repeat in range(rounds):
            for label, server_args in FLOOD_CONFIGS.items():
                print(f"flood ({label}, round {repeat + 1} of {rounds})...", flush=True)
                runs[label].append(run_flood(
                    model, [*server_args, "--max-queue-mb", str(QUEUE_MB)],
                    callers=FLOOD_CALLERS, rows=FLOOD_ROWS, seconds=FLOOD_SECONDS,
                    idle_seconds=3.0,
                ))  # fmt: skip
    return {label: median_of(results) for label, results in runs.items()}


def rest_step(tool, repeats: int):
    """REST against gRPC and a bare HTTP echo, alternating (bench/rest_compare.py)."""
    from bench import rest_compare

    print("REST against gRPC and the HTTP echo (alternating)...", flush=True)
    echo_http, server_http = free_port(), free_port()
    echo = Server("transport", ["bench/transport_server.py", "--http-port", str(echo_http)], False)
    argv = [*SERVE, "--frontends", str(FRONTENDS), "--metrics-port", "0"]
    server = Server(f"frontends={FRONTENDS}", [*argv, "--http-port", str(server_http)], True)
    try:
        server_ports = {"rest": f"127.0.0.1:{server_http}", "unary": server.target}
        targets = {"echo": {"rest": f"127.0.0.1:{echo_http}"}, "server": server_ports}
        return rest_compare.measure(tool, targets, repeats)
    finally:
        server.stop()
        echo.stop()


def explain_only(args) -> int:
    """Just the integrated-gradients step against the engine at batch 1024 (prints only)."""
    engine = engine_ceiling(args.repeats, "--batches", "1024", "--xla", "on")
    argv = [*SERVE, *SIDE_PORTS_OFF, "--frontends", "1"]
    server = Server("batched", argv, True)
    try:
        explain = integrated_gradients(server, args.repeats, args.seconds)
    finally:
        server.stop()
    from bench.report import explain_target

    print(explain_target(engine, explain))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--flood-rounds",
        type=int,
        default=FLOOD_REPEATS,
        help="rounds of the flood step (medians over them)",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per repeat of a step")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--only", choices=["flood"], help="run this step alone and print it")
    parser.add_argument("--only-explain", action="store_true",
                        help="run only the integrated-gradients step (prints only)")  # fmt: skip
    args = parser.parse_args()
    if args.only == "flood":
        from bench.report import render_flood

        print("\n".join(render_flood(flood_step(args.flood_rounds))))
        return 0
    if args.only_explain:
        return explain_only(args)
    from bench import perf, scaling  # bench/ is on the path only when run as a script
    from bench.report import DETERMINISTIC

    started = time.monotonic()
    tool, tool_note = perf.locate()
    print(tool_note, flush=True)
    print("engine ceiling (in-process)...", flush=True)
    engine = engine_ceiling(args.repeats)
    one = ["--frontends", "1"]
    configs = [
        ("transport", ["bench/transport_server.py"], False),
        ("unbatched", [*SERVE, *one, "--max-batch-size", "1"], True),
        ("batched", [*SERVE, *one], True),
        (f"frontends={FRONTENDS}", [*SERVE, "--frontends", str(FRONTENDS)], True),
        (DETERMINISTIC, [*SERVE, "--frontends", str(FRONTENDS), "--deterministic", "on"], True),
        ("stand-in", ["bench/stand_in.py", "--frontends", str(FRONTENDS)], True),
    ]
    results: list[StepResult] = []
    perf_results: list = []
    rss: dict[str, float] = {}
    costs: dict = {}
    explain = None
    for label, argv, health in configs:
        print(f"{label}...", flush=True)
        metrics_port = free_port() if health else None
        extra = ["--metrics-port", str(metrics_port)] if metrics_port else []
        extra += ["--http-port", "0"] if health else []
        server = Server(label, [*argv, *extra], health)
        try:
            if tool is not None:
                perf_results += perf.run(tool, server.target, label, server.process.pid,
                                         metrics_port, "quadratic")  # fmt: skip
            if label == "stand-in":
                continue
            results += measure(server, UNARY + STREAMS, args.repeats, args.seconds)
            if label.startswith("frontends"):
                costs = scaling.measure(server.target, metrics_port, server.process.pid)
            if label == "batched":
                explain = integrated_gradients(server, args.repeats, args.seconds)
        finally:
            server.stop()
        rss[label] = server.peak_rss_mb
    rest = rest_step(tool, args.repeats) if tool is not None else None
    floods = flood_step(args.flood_rounds)
    elapsed = time.monotonic() - started
    from bench.report import render, render_flood, render_perf, render_rest

    text = (
        render(engine, results, rss, elapsed, args, costs, explain)
        + "\n\n"
        + "\n".join(render_perf(perf_results, tool_note, engine))
        + "\n\n"
        + "\n".join(render_rest(rest))
        + "\n\n"
        + "\n".join(render_flood(floods))
    )
    print(text)
    if not args.no_write:
        write_doc(text)
        loadtest.plot(results, PLOT, title="gradserve benchmark: rows/s vs p99 latency")
        print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    failures = sum(r.unexpected_errors() for r in results)
    failures += sum(sum(f.lost.values()) for f in floods.values())
    return 1 if failures else 0


def write_section(begin: str, end: str, heading: str, text: str) -> None:
    """Replace the text between `begin` and `end` in the benchmarks document, or append it
    under `heading` the first time."""
    old = DOC.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in old:
        head, rest = old.split(begin, 1)
        DOC.write_text(head + block + rest.split(end, 1)[1])
    else:
        DOC.write_text(old.rstrip() + f"\n\n## {heading}\n\n{block}\n")


def write_doc(generated: str) -> None:
    """Replace the text between the bench markers, keeping the hand-written tuning log."""
    block = f"{BEGIN}\n{generated}\n{END}"
    if DOC.exists() and BEGIN in (old := DOC.read_text()):
        head, rest = old.split(BEGIN, 1)
        DOC.write_text(head + block + rest.split(END, 1)[1])
    else:
        DOC.write_text(f"# Benchmarks\n\n{block}\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
