"""The engine alone, in-process: rows/s per batch size (the compute ceiling), with today's
functions and with the deterministic ones (fixed tiles). Prints JSON.

Run as a script by bench/run.py so the load generator's process never loads TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from gradserve.server.config import BUNDLED_MODEL
from gradserve.server.engine.compiled import Engine
from gradserve.wire.kinds import Derivative


def seconds_per_call(engine: Engine, kind: Derivative, batch: int, repeats: int) -> float:
    """Median over `repeats` of the mean time of a run of calls lasting about 0.2 s."""
    x = np.random.default_rng(0).uniform(0, 1, (batch, *engine.input_shape)).astype(np.float32)
    engine.run(kind, x)
    calls = max(1, int(0.2 / max(_one_call(engine, kind, x), 1e-6)))
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            engine.run(kind, x)
        samples.append((time.perf_counter() - started) / calls)
    return statistics.median(samples)


def _one_call(engine: Engine, kind: Derivative, x: np.ndarray) -> float:
    started = time.perf_counter()
    engine.run(kind, x)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64,256,1024,16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--xla", default="on,off")
    parser.add_argument("--deterministic", default="off,on")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    out = []
    for deterministic in args.deterministic.split(","):
        for xla in args.xla.split(","):
            engine = Engine(BUNDLED_MODEL, xla=xla == "on", max_batch_size=max(batches),
                            deterministic=deterministic == "on")  # fmt: skip
            engine.warm_up()
            for kind in (Derivative.GRADIENT, Derivative.NONE, Derivative.JACOBIAN):
                for batch in batches:
                    s = seconds_per_call(engine, kind, batch, args.repeats)
                    out.append(
                        {"xla": xla, "deterministic": deterministic, "kind": kind.value,
                         "batch": batch, "us_per_call": s * 1e6, "rows_per_s": batch / s}
                    )  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
