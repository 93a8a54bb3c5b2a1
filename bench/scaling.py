"""Where a multi-process server spends CPU, and what more cores would give (`make bench`).

Runs two loads against a `--frontends N` server and reads, for each, the CPU time of every
process (from /proc) and the request, sub-batch and row counts (from its /metrics):
1-row unary calls at 64 callers (many small sub-batches) and 8 streams of 256-row messages
(few large ones). The engine's CPU is split into a cost per sub-batch and a cost per row by
solving the two loads' equations; the frontends' CPU per request comes from the first load.
From those, a projection of 1-row requests/s for more cores: every core but one runs a
frontend, one runs the engine. A projection, not a measurement.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gradserve.client import loadtest

CORES = (4, 8, 16, 32)
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _roles(supervisor: int) -> dict[str, list[int]]:
    """The supervisor's children: the engine (TensorFlow mapped) and the frontends."""
    roles: dict[str, list[int]] = {"engine": [], "frontends": []}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != supervisor:
                continue
            maps = (stat.parent / "maps").read_text()
        except OSError:
            continue
        if "tensorflow" in maps:
            roles["engine"].append(int(stat.parent.name))
        elif "grpc" in maps:
            roles["frontends"].append(int(stat.parent.name))
    return roles


def _counters(metrics_port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    counts = {"requests": 0.0, "sub_batches": 0.0, "engine_calls": 0.0, "rows": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, value = line.rsplit(" ", 1)
        engine = 'process="engine"' in name
        if name.startswith("gradserve_requests_total") and 'code="OK"' in name and not engine:
            counts["requests"] += float(value)
        elif name.startswith("gradserve_engine_calls_total"):
            counts["engine_calls" if engine else "sub_batches"] += float(value)
        elif name.startswith("gradserve_rows_computed_total") and engine:
            counts["rows"] += float(value)
    return counts


@dataclass
class Load:
    requests: float
    sub_batches: float
    rows: float
    frontend_cpu: float
    engine_cpu: float


def _measure(target: str, metrics_port: int, supervisor: int, step: dict) -> Load:
    asyncio.run(loadtest.run_step([target], duration=0.5, **step))
    roles = _roles(supervisor)
    before = {pid: _cpu_seconds(pid) for pids in roles.values() for pid in pids}
    counts = _counters(metrics_port)
    asyncio.run(loadtest.run_step([target], duration=3.0, **step))
    after = _counters(metrics_port)
    used = {pid: _cpu_seconds(pid) - start for pid, start in before.items()}
    delta = {k: after[k] - counts[k] for k in counts}
    return Load(
        requests=delta["requests"],
        sub_batches=delta["sub_batches"],
        rows=delta["rows"],
        frontend_cpu=sum(used[p] for p in roles["frontends"]),
        engine_cpu=sum(used[p] for p in roles["engine"]),
    )


def measure(target: str, metrics_port: int, supervisor: int) -> dict:
    """CPU costs from two loads, and the projection."""
    small = _measure(
        target,
        metrics_port,
        supervisor,
        {"mode": "unary", "concurrency": 64, "rows": 1, "window": 16},
    )
    large = _measure(target, metrics_port, supervisor,
                     {"mode": "stream", "concurrency": 8, "rows": 256, "window": 16})  # fmt: skip
    # engine_cpu = per_sub_batch * sub_batches + per_row * rows, for both loads
    det = small.sub_batches * large.rows - large.sub_batches * small.rows
    per_sub_batch = (small.engine_cpu * large.rows - large.engine_cpu * small.rows) / det
    per_row = (small.sub_batches * large.engine_cpu - large.sub_batches * small.engine_cpu) / det
    frontend_per_request = small.frontend_cpu / small.requests
    rows_per_sub_batch = small.rows / small.sub_batches
    engine_per_request = per_sub_batch / rows_per_sub_batch + per_row
    projection = {
        cores: min((cores - 1) / frontend_per_request, 1 / engine_per_request) for cores in CORES
    }
    return {
        "frontend_us_per_request": frontend_per_request * 1e6,
        "engine_us_per_sub_batch": per_sub_batch * 1e6,
        "engine_us_per_row": per_row * 1e6,
        "rows_per_sub_batch": rows_per_sub_batch,
        "measured_requests_per_s": small.requests / 3.0,
        "projected_requests_per_s": projection,
    }


def render(scaling: dict, frontends: int) -> list[str]:
    per_request = scaling["frontend_us_per_request"]
    per_sub_batch = scaling["engine_us_per_sub_batch"]
    lines = [
        f"### Scaling: where a `--frontends {frontends}` server spends CPU",
        "",
        "| measured (CPU time) | value |",
        "|---|---:|",
        f"| frontend, per 1-row request (64 callers) | {per_request:.0f} us |",
        f"| engine, per sub-batch (hand-off, merge, call) | {per_sub_batch:.0f} us |",
        f"| engine, per row | {scaling['engine_us_per_row']:.2f} us |",
        f"| rows per sub-batch at 64 callers | {scaling['rows_per_sub_batch']:.1f} |",
        "",
        "Projected 1-row requests/s with one core for the engine and the rest for frontends "
        "(from the costs above; a projection, not a measurement; the load generator's own CPU "
        "is not counted):",
        "",
        "| cores | " + " | ".join(str(c) for c in CORES) + " |",
        "|---|" + "---:|" * len(CORES),
        "| projected req/s | "
        + " | ".join(f"{scaling['projected_requests_per_s'][c]:,.0f}" for c in CORES)
        + " |",
    ]  # fmt: skip
    return lines
