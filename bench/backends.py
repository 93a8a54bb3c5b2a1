"""`make bench-backends` (part of `make bench`): TensorFlow, JAX and PyTorch side by side, in
one run.

- The engine alone, in-process, the bundled model: us per call and rows/s for every kind at
  batch 1 to 16,384, XLA on (JAX always compiles; PyTorch runs eagerly), each backend in a
  process of its own, the backends rotating over `--rounds` rounds; medians.
- The server per backend in the default shape (`--frontends 2` here) under perf_analyzer (1,
  16 and 64 callers unary, 16 streams; 1 row per request), the backends alternating; medians
  over the rounds, and CPU per request.
- Start-up to SERVING per backend; for JAX with an empty and then a warm persistent
  compilation cache (JAX_COMPILATION_CACHE_DIR).

Writes the result between the backends markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import perf  # noqa: E402
from bench.run import SERVE, Server, free_port, write_section  # noqa: E402

BEGIN, END = "<!-- backends:begin -->", "<!-- backends:end -->"
BACKENDS = ("tensorflow", "jax", "torch")
NAMES = {"tensorflow": "TF", "jax": "JAX", "torch": "torch"}
BATCHES = "1,64,256,1024,16384"


def ceiling(backend: str) -> list[dict]:
    """One engine_ceiling.py process: every kind at every batch, XLA on, not deterministic."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine_ceiling.py"), "--backend", backend,
         "--kinds", "all", "--xla", "on", "--deterministic", "off", "--repeats", "1",
         "--batches", BATCHES],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(run.stdout.strip().splitlines()[-1])


def ceilings(rounds: int) -> dict[tuple[str, str, int], float]:
    """(backend, kind, batch) -> median us per call over the rounds, backends alternating."""
    samples: dict[tuple[str, str, int], list[float]] = {}
    for round_ in range(rounds):
        for backend in _rotated(round_):
            print(f"engine ceiling, {backend}, round {round_ + 1}...", flush=True)
            for row in ceiling(backend):
                key = (backend, row["kind"], row["batch"])
                samples.setdefault(key, []).append(row["us_per_call"])
    return {key: statistics.median(values) for key, values in samples.items()}


@contextmanager
def environment(**values: str):
    """os.environ with `values` set (a Server child inherits it at start), then as before."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start(backend: str, label: str) -> tuple[Server, int, float]:
    """A default-shape server of `backend`, its metrics port and its seconds to SERVING."""
    metrics_port = free_port()
    argv = [*SERVE, "--backend", backend, "--metrics-port", str(metrics_port),
            "--http-port", "0"]  # fmt: skip
    started = time.monotonic()
    server = Server(label, argv, True)
    return server, metrics_port, time.monotonic() - started


def servers(tool: perf.Tool | None, rounds: int, cache: Path) -> tuple[dict, dict]:
    """perf_analyzer results per (backend, load) over the rounds, and start-up seconds per
    (backend, cache state)."""
    loads: dict[tuple[str, str], list[perf.PerfResult]] = {}
    startups: dict[str, list[float]] = {}
    for round_ in range(rounds):
        for backend in _rotated(round_):
            state = "" if backend != "jax" else (" (cold cache)" if round_ == 0 else
                                                 " (warm cache)")  # fmt: skip
            print(f"server, {backend}{state}, round {round_ + 1}...", flush=True)
            with environment(JAX_COMPILATION_CACHE_DIR=str(cache),
                             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"):  # fmt: skip
                server, metrics_port, seconds = start(backend, backend)
            startups.setdefault(backend + state, []).append(seconds)
            try:
                if tool is not None:
                    for result in perf.run(tool, server.target, backend, server.process.pid,
                                           metrics_port, "quadratic"):  # fmt: skip
                        loads.setdefault((backend, result.name), []).append(result)
            finally:
                server.stop()
    return loads, {key: statistics.median(values) for key, values in startups.items()}


def _rotated(round_: int) -> tuple[str, ...]:
    """The backends in the order of one round: each goes first in turn."""
    shift = round_ % len(BACKENDS)
    return BACKENDS[shift:] + BACKENDS[:shift]


def render(engine: dict, loads: dict, startups: dict, note: str, rounds: int) -> str:
    kinds = sorted({kind for _, kind, _ in engine})
    batches = [int(b) for b in BATCHES.split(",")]
    others = BACKENDS[1:]
    lines = [
        f"Run of {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, {rounds} rounds, "
        "backends rotating, medians. Engine: the bundled model in-process, us per call, "
        "XLA on for TensorFlow (JAX always compiles, PyTorch runs eagerly); a ratio < 1: that "
        "backend faster than TensorFlow.",
        "",
        "| kind | batch | "
        + " | ".join(f"{NAMES[b]} us" for b in BACKENDS)
        + " | "
        + " | ".join(f"{NAMES[b]} / TF" for b in others)
        + " | "
        + " | ".join(f"{NAMES[b]} rows/s" for b in BACKENDS)
        + " |",
        "|---|---:|" + "---:|" * (2 * len(BACKENDS) + len(others)),
    ]
    for kind in kinds:
        for batch in batches:
            us = [engine[(backend, kind, batch)] for backend in BACKENDS]
            cells = [kind, str(batch), *(f"{u:.0f}" for u in us),
                     *(f"{u / us[0]:.2f}" for u in us[1:]),
                     *(f"{batch / u * 1e6:,.0f}" for u in us)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Servers, default shape (`--frontends 2` here), 1 row per request; {note}.", ""]
    if loads:
        columns = [f"{NAMES[b]} {what}" for what in ("req/s", "p50 ms", "CPU us/req")
                   for b in BACKENDS]  # fmt: skip
        lines += ["| load | " + " | ".join(columns) + " |",
                  "|---|" + "---:|" * len(columns)]  # fmt: skip
        for name in dict.fromkeys(name for _, name in loads):
            per = [loads.get((backend, name), []) for backend in BACKENDS]
            if not all(per):
                continue
            cells = [name, *(f"{_median(r, 'req_s'):,.0f}" for r in per),
                     *(f"{_median(r, 'p50_ms'):.2f}" for r in per),
                     *(f"{_cpu(r):.0f}" for r in per)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Start-up to SERVING (seconds, default flags, bundled model): "
        + ", ".join(f"{key} {value:.1f}" for key, value in startups.items())
        + ".",
    ]
    return "\n".join(lines)


def _median(results: list[perf.PerfResult], field: str) -> float:
    return statistics.median(getattr(r, field) for r in results)


def _cpu(results: list[perf.PerfResult]) -> float:
    return statistics.median(sum(r.cpu_us.values()) for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    tool, note = perf.locate()
    print(note, flush=True)
    engine = ceilings(args.rounds)
    with tempfile.TemporaryDirectory() as cache:
        loads, startups = servers(tool, args.rounds, Path(cache))
    text = render(engine, loads, startups, note, args.rounds)
    print(text)
    if not args.no_write:
        write_section(BEGIN, END, "Backends", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
