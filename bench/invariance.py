"""How many rows' answers depend on their batch: `python bench/invariance.py [MODEL]`.

For each derivative kind, with XLA and without, deterministic or not, computes 64 rows alone
(one row per engine call), then inside batches of 2, 5, 32, 100 and 1024 rows and at shifted
positions (the same rows after 7 others), and counts the rows whose outputs or derivative
differ in any bit from the row computed alone. The 64 rows and the shift reach every position
of a deterministic engine's tile. MODEL defaults to an 8-64-64-3 tanh MLP built here (seeded).
Prints a table and the CPU's vector level (cap it with ONEDNN_MAX_CPU_ISA and
XLA_FLAGS=--xla_cpu_max_isa=...); writes nothing.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from gradserve.server.core.contract import ENGINE_KINDS
from gradserve.server.core.selfcheck import describe_cpu
from gradserve.server.engine.compiled import TensorFlowEngine
from gradserve.wire.kinds import Derivative

KINDS = [kind for kind in ENGINE_KINDS if kind is not Derivative.NONE]
BATCHES = (2, 5, 32, 100, 1024)
ROWS, SHIFT = 64, 7


def mlp(folder: Path) -> Path:
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input(shape=(8,)),
        keras.layers.Dense(64, activation="tanh"),
        keras.layers.Dense(64, activation="tanh"),
        keras.layers.Dense(3),
    ])  # fmt: skip
    path = folder / "mlp.keras"
    model.save(path)
    return path


def differing(
    engine: TensorFlowEngine, kind: Derivative, x: np.ndarray, v: np.ndarray | None
) -> int:
    """Rows (of the first ROWS) whose answer differs in any bit from the row alone."""

    def answer(rows: slice | np.ndarray) -> np.ndarray:
        outputs = engine.run(kind, x[rows], None if v is None else v[rows])
        n = outputs.y.shape[0]
        return np.concatenate([outputs.y.reshape(n, -1), outputs.dy_dx.reshape(n, -1)], axis=1)

    alone = np.concatenate([answer(slice(i, i + 1)) for i in range(ROWS)])
    count = 0
    for batch in BATCHES:
        got = answer(slice(0, batch))[:ROWS]
        count += _rows_differing(got, alone[: len(got)])
    shifted = np.r_[np.arange(ROWS, ROWS + SHIFT), np.arange(ROWS)]  # the rows after others
    count += _rows_differing(answer(shifted)[SHIFT:], alone)
    return count


def _rows_differing(a: np.ndarray, b: np.ndarray) -> int:
    return int((a.view(np.uint8) != b.view(np.uint8)).any(axis=1).sum())


MODES = [(False, False), (False, True), (True, False), (True, True)]  # (deterministic, xla)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(argv[0]) if argv else mlp(Path(folder))
        compared = sum(min(batch, ROWS) for batch in BATCHES) + ROWS
        print(f"rows differing from the row alone, of {compared} compared ({path.name}, "
              f"{describe_cpu()})")  # fmt: skip
        print(f"{'kind':<10}" + "".join(f"{_label(*mode):>24}" for mode in MODES))
        counts = {}
        for deterministic, xla in MODES:
            rng = np.random.default_rng(0)
            engine = TensorFlowEngine(
                path, xla=xla, max_batch_size=max(BATCHES), deterministic=deterministic
            )
            x = rng.standard_normal((max(BATCHES), *engine.input_shape)).astype(np.float32)
            for kind in KINDS:
                shape = engine.output_shape if kind is Derivative.VJP else engine.input_shape
                v = rng.standard_normal((len(x), *shape)).astype(np.float32)
                vector = v if kind.needs_vector else None
                counts[kind, deterministic, xla] = differing(engine, kind, x, vector)
        for kind in KINDS:
            cells = "".join(f"{counts[kind, *mode]:>24}" for mode in MODES)
            print(f"{kind.value:<10}{cells}")
    return 0


def _label(deterministic: bool, xla: bool) -> str:
    return f"{'deterministic' if deterministic else 'today'}, XLA {'on' if xla else 'off'}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
