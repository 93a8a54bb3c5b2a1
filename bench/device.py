"""The accelerator run (bench/device.sh starts it there): gradserve on a GPU with the JAX
backend, in one call of at most 8 minutes, three phases against one time budget:

1. The engine alone, JAX and PyTorch (`--backend torch`, Keras on PyTorch): us per call and
   rows/s per kind at batch 1 to 65,536, for the bundled model, the digits model and a
   4x1024 MLP, on the GPU and on the machine's CPU (each backend and device in a process of
   its own; a kind's larger batches are skipped once a call takes over a second).
2. The server, `--backend jax --device gpu:0`, for each `--frontends N`: 1-row requests from
   1, 64 and 256 callers and 256-row requests from 64 callers; perf_analyzer where it runs
   there, else `gradserve loadtest` spread over several processes. req/s, rows/s, p50/p99,
   rows per engine call, and CPU per request of every process (its /metrics).
3. The same frontends with the stand-in engine (bench/stand_in.py, no device work): the
   frontends' and the exchange's own ceiling.

Writes device.json and device.md into --out; `--render FILE` turns a device.json into the
accelerator section of docs/benchmarks.md. What does not fit the budget is left out and
listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import perf  # noqa: E402
from bench.run import SERVE, Server, free_port, write_section  # noqa: E402

BEGIN, END = "<!-- device:begin -->", "<!-- device:end -->"
BATCHES = "1,64,1024,16384,65536"
LOADS = (("unary", 1, 1), ("unary", 64, 1), ("unary", 256, 1), ("unary", 64, 256))
STAND_IN_LOADS = (("unary", 64, 1), ("unary", 256, 1))
SHARES = {"engine": 0.3, "servers": 0.45, "stand_in": 0.25}  # of the budget, in this order
ANSWERING_RPCS = ("Evaluate", "EvaluateStream", "ModelInfer", "ModelStreamInfer")
MLP = {"inputs": 32, "width": 1024, "depth": 4, "outputs": 4}


def make_mlp(path: Path) -> None:
    """The 4x1024 MLP (tanh, seeded weights: its speed, not its answers, is measured)."""
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(MLP["width"], activation="tanh") for _ in range(MLP["depth"])]
    model = keras.Sequential([keras.Input((MLP["inputs"],), name="x"), *layers,
                              keras.layers.Dense(MLP["outputs"])], name="mlp4x1024")  # fmt: skip
    model.save(path)


def machine() -> dict:
    gpu = ""
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return {"gpu": gpu or "none", "cores": os.cpu_count(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}  # fmt: skip


ENGINE_BACKENDS = ("jax", "torch")


def engine_phase(models: list[Path], budget: float) -> tuple[list[dict], list[str]]:
    """engine_ceiling.py per backend and device (the GPU first, if JAX sees one), every
    kind."""
    rows, notes = [], []
    devices = ["gpu:0", "cpu"] if _jax_sees_gpu() else ["cpu"]
    if devices == ["cpu"]:
        notes.append("JAX sees no GPU here: the engine was measured on the CPU only")
    deadline = time.monotonic() + budget
    runs = [(backend, device) for backend in ENGINE_BACKENDS for device in devices]
    for index, (backend, device) in enumerate(runs):
        left = (deadline - time.monotonic()) / (len(runs) - index)
        run = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "engine_ceiling.py"), "--backend", backend,
             "--kinds", "all", "--xla", "on", "--deterministic", "off", "--lazy",
             "--repeats", "3", "--run-seconds", "0.1", "--call-limit", "1",
             "--batches", BATCHES, "--device", device, "--budget", str(max(left - 15, 1)),
             "--models", ",".join(map(str, models))],
            capture_output=True, text=True, cwd=ROOT, timeout=left + 60,
        )  # fmt: skip
        if run.returncode != 0:
            notes.append(f"{backend} engine on {device} failed: {run.stderr.strip()[-400:]}")
            continue
        rows += json.loads(run.stdout.strip().splitlines()[-1])
    return rows, notes


def _jax_sees_gpu() -> bool:
    probe = "import jax, sys; sys.exit(0 if jax.devices()[0].platform == 'gpu' else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def _metrics(port: int) -> dict[str, float]:
    """CPU seconds per process, OK requests, engine calls and rows computed, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    sums: dict[str, float] = {}
    engine_lines = 'process="engine"' in text
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        is_engine = 'process="engine"' in name or not engine_lines
        if name.startswith("process_cpu_seconds_total"):
            process = (
                name.split('process="', 1)[1].split('"')[0] if "process=" in name else "server"
            )
            if process != "standby":
                sums[f"cpu:{process}"] = sums.get(f"cpu:{process}", 0.0) + float(value)
        elif name.startswith("gradserve_requests_total") and 'code="OK"' in name:
            if any(f'rpc="{rpc}"' in name for rpc in ANSWERING_RPCS):
                sums["requests"] = sums.get("requests", 0.0) + float(value)
        elif name.startswith("gradserve_engine_calls_total") and is_engine:
            sums["engine_calls"] = sums.get("engine_calls", 0.0) + float(value)
        elif name.startswith("gradserve_rows_computed_total") and is_engine:
            sums["rows"] = sums.get("rows", 0.0) + float(value)
    return sums


def _loadtest(target: str, mode: str, concurrency: int, rows: int, seconds: float) -> dict:
    """`gradserve loadtest` over several processes, so that the generator is not the limit:
    req/s summed, p50 the median of theirs, p99 the largest."""
    processes = 1 if concurrency < 16 else min(8, max(1, (os.cpu_count() or 2) // 4))
    each = max(1, concurrency // processes)
    code = ("import asyncio, dataclasses, json, sys; from gradserve.client import loadtest; "
            "t, m, c, r, s = sys.argv[1:]; "
            "asyncio.run(loadtest.run_step([t], mode=m, concurrency=int(c), rows=int(r), "
            "duration=1.0)); "
            "print(json.dumps(dataclasses.asdict(asyncio.run(loadtest.run_step([t], mode=m, "
            "concurrency=int(c), rows=int(r), duration=float(s))))))")  # fmt: skip
    argv = [sys.executable, "-c", code, target, mode, str(each), str(rows), str(seconds)]
    running = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
               for _ in range(processes)]  # fmt: skip
    results = [json.loads(p.communicate(timeout=seconds + 120)[0]) for p in running]
    return {
        "req_s": sum(r["requests_per_s"] for r in results),
        "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in results),
        "p99_ms": max(r["latency_ms"]["p99"] for r in results),
        "generator": f"loadtest x{processes}",
    }


def _perf(tool: perf.Tool, target: str, mode: str, concurrency: int, rows: int) -> dict | None:
    row = perf.load(tool, target, "quadratic", mode, concurrency, rows)
    if row is None:
        return None
    return {"req_s": float(row["Inferences/Second"]) / rows, "p50_ms":
            float(row["p50 latency"]) / 1e3, "p99_ms": float(row["p99 latency"]) / 1e3,
            "generator": "perf_analyzer"}  # fmt: skip


def measure_load(server: Server, metrics_port: int, tool, load: tuple) -> dict:
    mode, concurrency, rows = load
    before = _metrics(metrics_port)
    result = _perf(tool, server.target, mode, concurrency, rows) if tool else None
    if result is None:
        result = _loadtest(server.target, mode, concurrency, rows, 4.0)
    after = _metrics(metrics_port)
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    requests = delta.get("requests", 0.0) or 1.0
    result.update(
        mode=mode, concurrency=concurrency, rows=rows, rows_s=result["req_s"] * rows,
        mean_batch=delta.get("rows", 0.0) / max(delta.get("engine_calls", 0.0), 1.0),
        cpu_us={key[4:]: value / requests * 1e6 for key, value in delta.items()
                if key.startswith("cpu:")},
    )  # fmt: skip
    return result


def server_phase(
    label: str, argv: list[str], frontends: list[int], loads, budget: float, tool
) -> tuple[list[dict], list[str]]:
    """Each --frontends N: start, every load, stop; what the budget leaves out is noted."""
    rows, notes, deadline = [], [], time.monotonic() + budget
    for n in frontends:
        if time.monotonic() > deadline - 20:
            notes.append(f"{label}: --frontends {n} and more left out (time budget)")
            break
        metrics_port = free_port()
        started = time.monotonic()
        server = Server(f"{label} x{n}", [*argv, "--frontends", str(n), "--metrics-port",
                                          str(metrics_port), "--http-port", "0"], True)  # fmt: skip
        startup = time.monotonic() - started
        try:
            for load in loads:
                if time.monotonic() > deadline:
                    notes.append(f"{label} --frontends {n}: {load} left out (time budget)")
                    continue
                result = measure_load(server, metrics_port, tool, load)
                result.update(server=label, frontends=n, startup_s=startup)
                rows.append(result)
                print(f"  {label} x{n} {load}: {result['req_s']:,.0f} req/s, p50 "
                      f"{result['p50_ms']:.2f} ms", flush=True)  # fmt: skip
        finally:
            server.stop()
    return rows, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "device-run")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds, all phases")
    parser.add_argument("--frontends", default="1,2,4,8,14")
    parser.add_argument("--render", type=Path, help="a device.json: write docs/benchmarks.md")
    args = parser.parse_args()
    if args.render:
        write_section(BEGIN, END, "Accelerator", render(json.loads(args.render.read_text())))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax-cache-"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.monotonic()
    frontends = [int(n) for n in args.frontends.split(",")]
    tool, why = perf.locate()
    report = {"machine": machine(), "load_generator": why, "notes": []}
    print(f"{report['machine']}; {why}", flush=True)
    mlp = args.out / "mlp4x1024.keras"
    if not mlp.exists():
        subprocess.run([sys.executable, __file__, "--make-mlp", str(mlp)], check=True, cwd=ROOT)
    models = [ROOT / "server" / "models" / "quadratic.keras",
              ROOT / "server" / "models" / "digits.keras", mlp]  # fmt: skip
    report["engine"], notes = engine_phase(models, args.budget * SHARES["engine"])
    report["notes"] += notes
    device = report["server_device"] = "gpu:0" if report["machine"]["gpu"] != "none" else "cpu"
    left = args.budget - (time.monotonic() - started)
    share = SHARES["servers"] / (SHARES["servers"] + SHARES["stand_in"])
    jax_server = [*SERVE, "--backend", "jax", "--device", device, "--max-batch-size", "4096"]
    report["servers"], notes = server_phase("jax", jax_server, frontends, LOADS, left * share,
                                            tool)  # fmt: skip
    report["notes"] += notes
    left = args.budget - (time.monotonic() - started)
    stand_in = [str(ROOT / "bench" / "stand_in.py"), "--max-batch-size", "4096"]
    report["stand_in"], notes = server_phase("stand-in", stand_in, frontends, STAND_IN_LOADS,
                                             left, tool)  # fmt: skip
    report["notes"] += notes
    report["seconds"] = time.monotonic() - started
    (args.out / "device.json").write_text(json.dumps(report, indent=1))
    (args.out / "device.md").write_text(render(report) + "\n")
    print(render(report))
    return 0


def render(report: dict) -> str:
    m = report["machine"]
    rehearsal = [
        "**A rehearsal, not the accelerator run**: no GPU on this machine (`make "
        "device-rehearsal`, TensorFlow hidden, everything on the CPU and the load "
        "generator on the same cores). It shows the script runs as it will there.",
        "",
    ]
    lines = [*(rehearsal if m["gpu"] == "none" else []),
             f"Run of {m['date']}: GPU {m['gpu']}; {m['cpu']}, {m['cores']} cores; Python "
             f"{m['python']}. Load generator: "
             f"{report['load_generator']}. Run took {report['seconds']:.0f} s.", "",
             "Engine alone, us per call (rows/s):", "",
             "| backend | model | kind | batch | " + " | ".join(_devices(report)) + " |",
             "|---|---|---|---:|" + "---:|" * len(_devices(report))]  # fmt: skip
    table: dict[tuple, dict[str, dict]] = {}
    for row in report["engine"]:
        key = (row.get("backend", "jax"), row["model"], row["kind"], row["batch"])
        table.setdefault(key, {})[row["device"]] = row
    for (backend, model, kind, batch), by_device in table.items():
        cells = [f"{r['us_per_call']:,.0f} ({r['rows_per_s']:,.0f})" if (r := by_device.get(d))
                 else "-" for d in _devices(report)]  # fmt: skip
        lines.append(f"| {backend} | {model} | {kind} | {batch:,} | " + " | ".join(cells) + " |")
    where = report["server_device"]
    titles = {
        "servers": f"Server, --backend jax --device {where} (--frontends 1: one process)",
        "stand_in": "Server with the stand-in engine (no device work)",
    }
    for key, title in titles.items():
        lines += ["", f"{title}, gradient of the bundled model:", "",
                  "| frontends | callers | rows/request | req/s | rows/s | p50 ms | p99 ms | "
                  "rows per engine call | CPU us/request per process | generator |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
        for r in report[key]:
            cpu = ", ".join(f"{p} {us:,.0f}" for p, us in sorted(r["cpu_us"].items()))
            lines.append(f"| {r['frontends']} | {r['concurrency']} | {r['rows']} | "
                         f"{r['req_s']:,.0f} | {r['rows_s']:,.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['mean_batch']:.1f} | {cpu} | "
                         f"{r['generator']} |")  # fmt: skip
    lines += ["", *(f"- {note}" for note in report["notes"])] if report["notes"] else []
    return "\n".join(lines)


def _devices(report: dict) -> list[str]:
    return sorted({row["device"] for row in report["engine"]}, key=lambda d: "cpu" in d)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-mlp":
        make_mlp(Path(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
