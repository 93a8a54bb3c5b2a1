"""The engine alone, in-process: rows/s per batch size (the compute ceiling), with today's
functions and with the deterministic ones (fixed tiles), on one backend (--backend: each
backend's run is a process of its own, as Keras takes its backend once per process). Prints
JSON.

Run as a script by bench/run.py so the load generator's process never loads TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from gradserve.server.config import BACKENDS, BUNDLED_MODEL
from gradserve.server.core.contract import ModelSpec
from gradserve.wire.kinds import Derivative

KINDS = {"common": (Derivative.GRADIENT, Derivative.NONE, Derivative.JACOBIAN),
         "all": tuple(Derivative)}  # fmt: skip


def seconds_per_call(
    engine, kind: Derivative, batch: int, repeats: int, run_seconds: float = 0.2
) -> float:
    """Median over `repeats` of the mean time of a run of calls lasting about `run_seconds`
    (at least one call each)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch, *engine.input_shape)).astype(np.float32)
    shape = ModelSpec.of(engine, batch, batch).vector_shape(kind)
    v = None if shape is None else rng.normal(size=(batch, *shape)).astype(np.float32)
    engine.run(kind, x, v)
    calls = max(1, int(run_seconds / max(_one_call(engine, kind, x, v), 1e-6)))
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            engine.run(kind, x, v)
        samples.append((time.perf_counter() - started) / calls)
    return statistics.median(samples)


def _one_call(engine, kind: Derivative, x: np.ndarray, v: np.ndarray | None) -> float:
    started = time.perf_counter()
    engine.run(kind, x, v)
    return time.perf_counter() - started


def engine_class(backend: str) -> type:
    """The backend's engine class, Keras set to that backend before it is first imported."""
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax":
        from gradserve.server.engine.jax_engine import JaxEngine

        return JaxEngine
    if backend == "torch":
        from gradserve.server.engine.torch_engine import TorchEngine

        return TorchEngine
    from gradserve.server.engine.compiled import TensorFlowEngine

    return TensorFlowEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64,256,1024,16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--xla", default="on,off")
    parser.add_argument("--deterministic", default="off,on")
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow")
    parser.add_argument(
        "--kinds",
        choices=sorted(KINDS),
        default="common",
        help="common: gradient, outputs, Jacobian; all: every kind",
    )
    parser.add_argument("--models", default=str(BUNDLED_MODEL), help="comma list of files")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--lazy",
        action="store_true",
        help="compile only the sizes measured, on first use, instead of "
        "warming the whole ladder up",
    )
    parser.add_argument(
        "--call-limit",
        type=float,
        default=float("inf"),
        help="after a call this slow (s), skip the kind's larger batches",
    )
    parser.add_argument(
        "--run-seconds", type=float, default=0.2, help="length of each timed run of calls"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=float("inf"),
        help="seconds; what is left unmeasured then is left out",
    )
    args = parser.parse_args()  # fmt: skip
    deadline = time.monotonic() + args.budget
    batches = [int(b) for b in args.batches.split(",")]
    backend_engine = engine_class(args.backend)
    kinds = [kind for kind in KINDS[args.kinds] if not kind.explains]
    out = []
    for model in args.models.split(","):
        for deterministic in args.deterministic.split(","):
            for xla in args.xla.split(","):
                engine = backend_engine(model, xla=xla == "on", max_batch_size=max(batches),
                                deterministic=deterministic == "on",
                                device=args.device)  # fmt: skip
                if not args.lazy:
                    engine.warm_up(kinds)
                for kind in kinds:
                    per_row = 0.0  # seconds per row at the last batch measured
                    for batch in batches:
                        if time.monotonic() > deadline or per_row * batch > args.call_limit:
                            break
                        started = time.monotonic()
                        s = seconds_per_call(engine, kind, batch, args.repeats, args.run_seconds)
                        per_row = s / batch
                        out.append(
                            {"backend": args.backend, "model": engine.name,
                             "device": engine.device, "xla": xla,
                             "deterministic": deterministic, "kind": kind.value, "batch": batch,
                             "us_per_call": s * 1e6, "rows_per_s": batch / s,
                             "measured_s": time.monotonic() - started}
                        )  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
