"""The flood: many callers sending large requests in a loop while one caller sends 1-row ones.

Serves a model with 64x64x3 inputs (a small Dense head on 12,288 inputs, built here) in a
server subprocess, measures the light caller's latency alone, then during the flood, and
the server's resident memory: its baseline after warm-up, and during the flood its peak,
the highest of a sample every SAMPLE_S of what all its processes hold together (each
process's private and file-backed resident pages, plus its shared-memory segments counted
once, though two processes map each), and, as an upper bound, the sum of each process's
own high-water mark (reset just before; their peaks need not coincide, and a segment counts
in both processes that map it). Used by `make bench` (full size) and by
tests/test_flood.py (scaled down). Refused flood calls (RESOURCE_EXHAUSTED) back off
briefly and try again, as the SDK does; any other failure counts as lost.

Every caller runs outside the measuring process, so that what is measured is the server:
the light caller in a process of its own (`python bench/flood.py light TARGET SECONDS
TIMEOUT`), connected (one call made) before the flood starts, so its latencies are neither
those of a client event loop busy with the flood nor a newcomer's first call; the
flooders in FLOOD_PROCESSES processes (`python bench/flood.py flood TARGET CALLERS ROWS
SEED SECONDS`), each caller on a connection of its own, sending its request pre-encoded and
keeping the answer's bytes unparsed, so the clients spend their CPU on the connection, not
on protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.tensors import to_tensor

INPUT_SHAPE = (64, 64, 3)
REFUSED = grpc.StatusCode.RESOURCE_EXHAUSTED
BACKOFF_S = 0.05  # a refused flood caller waits this long before trying again
FLOOD_PROCESSES = 4  # the flooding callers are spread over this many processes
QUEUE_MB = 512  # --max-queue-mb of `make bench`'s flood
# What the process may hold beyond 1.2 x --max-queue-mb under it (the engine's batch, the
# one newcomer's message, answers not yet read by their clients, the allocator's slack).
MARGIN_MB = 150
LIGHT_P99_MS = 300  # the light caller's p99 under `make bench`'s flood
SAMPLE_S = 0.02  # how often the server's memory is sampled during the flood


def build_model(path: Path) -> Path:
    """Save a small Dense head on 64x64x3 inputs as .keras (imports Keras here only)."""
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model.save(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`gradserve serve` in a subprocess on a free loopback port, with its memory figures."""

    def __init__(self, model: Path, args: list[str], start_timeout: float = 120) -> None:
        self.port = _free_port()
        self.target = f"127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "gradserve.server.cli", "serve", "--model", str(model)]
        argv += ["--port", str(self.port), "--metrics-port", "0", "--http-port", "0"]
        argv += ["--drain-seconds", "10"]
        argv += ["--frontends", "1", *args]  # one process unless `args` say otherwise
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while time.monotonic() < end:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited: {self.process.stderr.read()[-2000:]}")
                try:
                    if check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("server did not become ready in time")

    def _pids(self) -> list[int]:
        """The server's processes: the one started and its children (with --frontends N: the
        engine process, the frontends and the standby)."""
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return [pid, *map(int, children)]

    def _status_mb(self, key: str) -> float:
        """`key` (VmRSS, VmHWM) summed over the server's processes: for VmHWM the sum of each
        process's own peak, at least the peak of the sum."""
        total = 0.0
        for pid in self._pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # it ended meanwhile
                continue
            line = next(x for x in status.splitlines() if x.startswith(key + ":"))
            total += int(line.split()[1]) / 1024
        return total

    def rss_mb(self) -> float:
        return self._status_mb("VmRSS")

    def held_mb(self) -> float:
        """What the server's processes hold together now: each one's anonymous and
        file-backed resident pages, and its shared-memory segments (/dev/shm) once."""
        total = self._status_mb("RssAnon") + self._status_mb("RssFile")
        with os.scandir("/dev/shm") as entries:
            prefix = f"gradserve-{self.process.pid}-"
            for entry in entries:
                if entry.name.startswith(prefix):
                    with contextlib.suppress(OSError):  # removed meanwhile
                        total += entry.stat().st_blocks * 512 / 2**20
        return total

    def reset_peak(self) -> bool:
        """Reset the kernel's peak-RSS mark of every server process to its current RSS (False
        where unsupported)."""
        try:
            for pid in self._pids():
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def peak_rss_mb(self) -> float:
        return self._status_mb("VmHWM")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process.stderr.close()


@dataclass
class FloodResult:
    """One flood run's figures (latencies in ms, memory in MB)."""

    callers: int
    rows: int
    seconds: float
    light_idle_ms: dict[str, float]
    light_flood_ms: dict[str, float]
    flood_rows_per_s: float
    answered: int
    refused: int
    lost: dict[str, int]
    baseline_rss_mb: float
    peak_rss_mb: float  # the highest sample of what the processes held together
    peak_hwm_sum_mb: float = float("nan")  # the sum of each process's own peak (upper bound)
    args: list[str] = field(default_factory=list)


def median_of(runs: list[FloodResult]) -> FloodResult:
    """One result for several runs of the same server: each figure's median over them (the
    light caller's percentiles each on its own), the calls lost summed."""
    first = runs[0]

    def median(values) -> float:
        return float(np.median([float(value) for value in values]))

    def latencies(key: str) -> dict[str, float]:
        return {name: median(getattr(r, key)[name] for r in runs) for name in first.light_idle_ms}

    lost: dict[str, int] = {}
    for run in runs:
        for code, n in run.lost.items():
            lost[code] = lost.get(code, 0) + n
    return FloodResult(
        callers=first.callers,
        rows=first.rows,
        seconds=median(r.seconds for r in runs),
        light_idle_ms=latencies("light_idle_ms"),
        light_flood_ms=latencies("light_flood_ms"),
        flood_rows_per_s=median(r.flood_rows_per_s for r in runs),
        answered=round(median(r.answered for r in runs)),
        refused=round(median(r.refused for r in runs)),
        lost=lost,
        baseline_rss_mb=median(r.baseline_rss_mb for r in runs),
        peak_rss_mb=median(r.peak_rss_mb for r in runs),
        peak_hwm_sum_mb=median(r.peak_hwm_sum_mb for r in runs),
        args=first.args,
    )


def _percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    ms = np.array(latencies) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "n": len(ms),
    }


def _request(rows: int, seed: int) -> pb.EvaluateRequest:
    x = np.random.default_rng(seed).uniform(0, 1, size=(rows, *INPUT_SHAPE))
    return pb.EvaluateRequest(x=to_tensor(x.astype(np.float32)))


async def _light(
    target: str, seconds: float, timeout: float, ready=None
) -> tuple[list[float], dict]:
    """1-row calls back to back for `seconds`, on a connection the server has seen one call
    on (and, with `ready`, once `ready()` returns): their latencies and any failures."""
    request, latencies, failures = _request(1, 0), [], {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        await stub.Evaluate(request, timeout=timeout)
        if ready is not None:
            await ready()
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            began = time.perf_counter()
            try:
                await stub.Evaluate(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                failures[error.code().name] = failures.get(error.code().name, 0) + 1
                continue
            latencies.append(time.perf_counter() - began)
    return latencies, failures


async def _ready_then_go() -> None:
    """Say "ready" on stdout, then wait for the measuring process's line on stdin."""
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)


def _light_process(target: str, seconds: float, timeout: float) -> subprocess.Popen:
    """The light caller in its own process; `_light_result` collects what it measured."""
    argv = [sys.executable, str(Path(__file__).resolve()), "light", target, str(seconds)]
    argv.append(str(timeout))
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _light_result(process: subprocess.Popen, timeout: float) -> tuple[list[float], dict]:
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"the light caller failed with exit status {process.returncode}")
    measured = json.loads(out)
    return measured["latencies"], measured["failures"]


@dataclass
class _FloodTally:
    answered: int = 0
    refused: int = 0
    lost: dict[str, int] = field(default_factory=dict)


async def _flooder(
    target: str, request: bytes, until: float, tally: _FloodTally, go: asyncio.Event
) -> None:
    """One flooding caller on its own connection (made before `go`): the pre-encoded
    request in a loop from `go` until `until` (set when `go` is)."""
    async with grpc.aio.insecure_channel(target, options=_BIG_MESSAGES) as channel:
        await channel.channel_ready()
        evaluate = channel.unary_unary(EVALUATE)  # bytes in, bytes out: no protobuf work
        await go.wait()
        while time.perf_counter() < until[0]:
            try:
                await evaluate(request, timeout=120)
            except grpc.aio.AioRpcError as error:
                if error.code() == REFUSED:
                    tally.refused += 1
                    await asyncio.sleep(BACKOFF_S)
                else:
                    tally.lost[error.code().name] = tally.lost.get(error.code().name, 0) + 1
                continue
            tally.answered += 1


_BIG_MESSAGES = [("grpc.max_receive_message_length", 256 << 20)]
EVALUATE = "/gradserve.v1.GradientService/Evaluate"


async def _flooders(target: str, callers: int, rows: int, seed: int, seconds: float):
    """`callers` flooding callers of one process: connected and their requests encoded, it
    prints "ready" and waits for a line on stdin, then floods for `seconds`; their tally."""
    requests = [_request(rows, seed + i).SerializeToString() for i in range(callers)]
    tally, go, until = _FloodTally(), asyncio.Event(), [0.0]
    callers_done = asyncio.gather(
        *(_flooder(target, request, until, tally, go) for request in requests)
    )
    await asyncio.sleep(0.5)  # let the callers connect
    await _ready_then_go()
    until[0] = time.perf_counter() + seconds
    go.set()
    await callers_done
    return tally


def _flood(target: str, callers: int, rows: int, seconds: float, light_timeout: float):
    """The flooders' processes and the light caller's, run together: the flooders' tally
    (the light caller's failures among its losses), its latencies and how long it took."""
    shares = [callers // FLOOD_PROCESSES + (i < callers % FLOOD_PROCESSES)
              for i in range(min(callers, FLOOD_PROCESSES))]  # fmt: skip
    script = str(Path(__file__).resolve())
    floods = [
        subprocess.Popen([sys.executable, script, "flood", target, str(share), str(rows),
                          str(1 + 1000 * i), str(seconds)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i, share in enumerate(shares)
    ]  # fmt: skip
    light, tally = _light_process(target, seconds, light_timeout), _FloodTally()
    try:
        for process in (*floods, light):  # every caller connected, its requests encoded
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a calling process did not start")
        started = time.perf_counter()
        for process in (*floods, light):
            process.stdin.write("go\n")
            process.stdin.flush()
        for process in floods:
            out, _ = process.communicate(timeout=seconds + 180)
            if process.returncode != 0:
                raise RuntimeError(f"a flooding process failed ({process.returncode})")
            part = json.loads(out)
            tally.answered += part["answered"]
            tally.refused += part["refused"]
            for code, n in part["lost"].items():
                tally.lost[code] = tally.lost.get(code, 0) + n
        elapsed = time.perf_counter() - started  # flooders finish their last call after it
        latencies, failures = _light_result(light, timeout=seconds + light_timeout + 60)
    finally:
        for process in (*floods, light):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    for code, n in failures.items():
        tally.lost[f"light:{code}"] = n
    return tally, latencies, elapsed


def run_flood(
    model: Path,
    server_args: list[str],
    *,
    callers: int,
    rows: int,
    seconds: float,
    idle_seconds: float,
    light_timeout: float = 30,
) -> FloodResult:
    """Start a server with `server_args`, measure the light caller idle, then the flood."""
    server = ServerProcess(model, server_args)
    try:
        asyncio.run(_light(server.target, 0.5, light_timeout))  # warm
        idle, _ = asyncio.run(_light(server.target, idle_seconds, light_timeout))
        baseline = server.held_mb()
        reset = server.reset_peak()
        with _PeakSampler(server.held_mb) as sampled:
            tally, latencies, elapsed = _flood(server.target, callers, rows, seconds,
                                               light_timeout)  # fmt: skip
        hwm_sum = server.peak_rss_mb() if reset else float("nan")
    finally:
        server.stop()
    return FloodResult(
        callers=callers,
        rows=rows,
        seconds=elapsed,
        light_idle_ms=_percentiles(idle),
        light_flood_ms=_percentiles(latencies),
        flood_rows_per_s=tally.answered * rows / elapsed,
        answered=tally.answered,
        refused=tally.refused,
        lost=tally.lost,
        baseline_rss_mb=baseline,
        peak_rss_mb=sampled.peak,
        peak_hwm_sum_mb=hwm_sum,
        args=server_args,
    )


class _PeakSampler:
    """The highest value `measure()` took, sampled every SAMPLE_S on a thread while in use."""

    def __init__(self, measure) -> None:
        self._measure = measure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0.0

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, self._measure())

    def __enter__(self) -> _PeakSampler:
        self.peak = self._measure()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.peak = max(self.peak, self._measure())


def _light_main(target: str, seconds: str, timeout: str) -> None:
    light = _light(target, float(seconds), float(timeout), ready=_ready_then_go)
    latencies, failures = asyncio.run(light)
    print(json.dumps({"latencies": latencies, "failures": failures}))


def _flood_main(target: str, callers: str, rows: str, seed: str, seconds: str) -> None:
    tally = asyncio.run(_flooders(target, int(callers), int(rows), int(seed), float(seconds)))
    print(json.dumps({"answered": tally.answered, "refused": tally.refused, "lost": tally.lost}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "light":
        _light_main(*sys.argv[2:])
    elif len(sys.argv) == 7 and sys.argv[1] == "flood":
        _flood_main(*sys.argv[2:])
    else:
        sys.exit("usage: flood.py light TARGET SECONDS TIMEOUT | flood TARGET CALLERS ROWS SEED "
                 "SECONDS")  # fmt: skip
