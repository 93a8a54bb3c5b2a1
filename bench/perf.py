"""Drive a server with NVIDIA perf_analyzer (an independent C++ load generator) over the
standard protocol, 1 row per request, and measure what each request costs in CPU.

perf_analyzer comes from `make perf-analyzer` (build/perf_analyzer: the files of the last
tritonclient wheel that carries it, the CUDA runtime library it links, no GPU needed, and
libb64 in lib/), or from $PERF_ANALYZER. Where it cannot run, `locate` says why and the bench
falls back to `gradserve loadtest`.

CPU per request: each process's CPU seconds over a load (from the server's /metrics,
`process_cpu_seconds_total` per process; from /proc for a server without metrics) divided
by the requests it answered (the server's request counter; else perf_analyzer's rate times
the load's duration).
"""

from __future__ import annotations

import csv
import os
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = ROOT / "build" / "perf_analyzer"
LOADS = [("unary", 1), ("unary", 16), ("unary", 64), ("stream", 16)]

_TICK = os.sysconf("SC_CLK_TCK")
_WINDOW_MS = "2000"  # one measurement window; stable over 3 within 40 %, at most 10 tries


@dataclass(frozen=True)
class Tool:
    path: Path
    env: dict[str, str]


@dataclass
class PerfResult:
    label: str
    mode: str
    concurrency: int
    req_s: float
    p50_ms: float
    p99_ms: float
    cpu_us: dict[str, float] = field(default_factory=dict)  # role -> CPU us per request
    sub_batches_per_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.mode} x{self.concurrency}"


def locate() -> tuple[Tool | None, str]:
    """perf_analyzer if it runs here, else None and why not."""
    path = Path(os.environ.get("PERF_ANALYZER", INSTALLED / "bin" / "perf_analyzer"))
    if not path.is_file():
        return None, f"no perf_analyzer at {path} (`make perf-analyzer` installs it)"
    libraries = (path.parent.parent / "nvidia" / "cuda_runtime" / "lib", path.parent.parent / "lib")
    library_path = ":".join(
        [*map(str, libraries), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
    )
    env = {**os.environ, "LD_LIBRARY_PATH": library_path}
    probe = subprocess.run([str(path)], env=env, capture_output=True, text=True, timeout=30)
    if "error while loading shared libraries" in probe.stderr:
        return None, f"perf_analyzer does not run here: {probe.stderr.strip()}"
    return Tool(path, env), f"perf_analyzer at {path}"


def _metric_sums(port: int) -> dict[str, float]:
    """From a server's /metrics: CPU seconds per process role, requests, sub-batches."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        engine = 'process="engine"' in name
        if name.startswith("process_cpu_seconds_total"):
            role = "engine" if engine else "frontends" if "frontend" in name else "server"
            if 'process="standby"' not in name:
                sums[role] = sums.get(role, 0.0) + float(value)
        elif name.startswith("gradserve_requests_total") and 'code="OK"' in name and not engine:
            sums["requests"] = sums.get("requests", 0.0) + float(value)
        elif name.startswith("gradserve_engine_calls_total") and not engine:
            sums["sub_batches"] = sums.get("sub_batches", 0.0) + float(value)
    return sums


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _counters(pid: int, metrics_port: int | None) -> dict[str, float]:
    if metrics_port:
        return _metric_sums(metrics_port)
    return {"server": _proc_cpu(pid)}


def run(
    tool: Tool, target: str, label: str, pid: int, metrics_port: int | None, model: str
) -> list[PerfResult]:
    """Every load of LOADS against one server; CPU per request of each of its roles."""
    results = []
    for mode, concurrency in LOADS:
        before, started = _counters(pid, metrics_port), time.monotonic()
        row = load(tool, target, model, mode, concurrency)
        after, seconds = _counters(pid, metrics_port), time.monotonic() - started
        if row is None:
            print(f"  {label:<12} {mode:<6} x{concurrency:<3} perf_analyzer gave no figure")
            continue
        rate = float(row["Inferences/Second"])
        requests = after.get("requests", 0) - before.get("requests", 0) or rate * seconds
        if not requests:
            print(f"  {label:<12} {mode:<6} x{concurrency:<3} no request was answered")
            continue
        roles = [r for r in ("server", "frontends", "engine") if r in after]
        cpu = {r: (after[r] - before[r]) / requests * 1e6 for r in roles}
        sub_batches = (after.get("sub_batches", 0) - before.get("sub_batches", 0)) / seconds
        result = PerfResult(label, mode, concurrency, rate, float(row["p50 latency"]) / 1e3,
                            float(row["p99 latency"]) / 1e3, cpu, sub_batches)  # fmt: skip
        results.append(result)
        print(f"  {label:<12} {result.name:<10} {rate:>8.0f} req/s  p50 {result.p50_ms:.2f} ms  "
              + "  ".join(f"{r} {us:.0f} us" for r, us in cpu.items()), flush=True)  # fmt: skip
    return results


def load(
    tool: Tool, target: str, model: str, mode: str, concurrency: int, rows: int = 1
) -> dict[str, str] | None:
    """One load of `rows`-row requests: mode unary or stream (gRPC) or rest (HTTP, binary
    tensors both ways); perf_analyzer's CSV row, its rate counting rows ("inferences")."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.csv"
        protocol = "http" if mode == "rest" else "grpc"
        args = [str(tool.path), "-m", model, "-i", protocol, "-u", target, "--shape", "x:1",
                "-b", str(rows), "--concurrency-range", f"{concurrency}:{concurrency}",
                "-p", _WINDOW_MS, "-s", "40", "--max-trials", "10", "-f", str(out)]  # fmt: skip
        if mode == "stream":
            args.append("--streaming")
        done = subprocess.run(args, env=tool.env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not out.exists():
            print(done.stdout[-500:], done.stderr[-500:])
            return None
        return next(csv.DictReader(out.open()))
