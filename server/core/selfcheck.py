"""The deterministic mode's promise, checked on the machine that makes it.

A deterministic engine computes every batch as tiles of a fixed number of rows, so a row's
bits may not depend on what else is in its batch. That holds only if a kernel's arithmetic is
the same for every position of a tile, which is a property of the kernels the CPU's vector
level selects at run time, not a documented guarantee (tuning log 65: on AVX2, oneDNN computed
the last 2 rows of a 32-row tile by another path). So before a kind answers anyone, the engine
computes one tile in which the same random row fills every position; every row of the answer
must be the same in every bit, or the engine refuses to serve that kind.

Framework-free: any backend's engine checks itself with `verify`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradserve.server.core.contract import Outputs, Shape
from gradserve.server.core.errors import StartRefused
from gradserve.wire.kinds import Derivative

SEED = 20261207  # the random row and vector: the same on every start, so a failure replays


@dataclass(frozen=True)
class VectorLevel:
    """One x86-64 vector instruction set the kernels can dispatch to at run time, and how to
    cap every dispatcher at it: oneDNN (`ONEDNN_MAX_CPU_ISA`), XLA's CPU code generator
    (`--xla_cpu_max_isa` in `XLA_FLAGS`), and PyTorch's own kernels (`ATEN_CPU_CAPABILITY`)
    and MKL (`MKL_ENABLE_INSTRUCTIONS`)."""

    name: str
    cpu_flag: str  # in /proc/cpuinfo when the CPU has it
    onednn: str
    xla: str
    aten: str
    mkl: str

    def cap(self) -> dict[str, str]:
        """The environment that keeps a process's kernels at or below this level."""
        return {
            "ONEDNN_MAX_CPU_ISA": self.onednn,
            "XLA_FLAGS": f"--xla_cpu_max_isa={self.xla}",
            "ATEN_CPU_CAPABILITY": self.aten,
            "MKL_ENABLE_INSTRUCTIONS": self.mkl,
        }


VECTOR_LEVELS = (  # lowest first
    VectorLevel("SSE4.1", "sse4_1", "SSE41", "SSE4_2", "default", "SSE4_2"),
    VectorLevel("AVX", "avx", "AVX", "AVX", "default", "AVX"),
    VectorLevel("AVX2", "avx2", "AVX2", "AVX2", "avx2", "AVX2"),
    VectorLevel("AVX-512", "avx512f", "AVX512_CORE", "AVX512", "avx512", "AVX512"),
)


def supported_levels(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[VectorLevel]:
    """The levels this CPU has (none where /proc/cpuinfo does not say: not x86-64 Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    return [level for level in VECTOR_LEVELS if level.cpu_flag in flags]


def describe_cpu() -> str:
    """The highest vector level of this CPU and the caps in force, for messages and logs."""
    levels = supported_levels()
    top = levels[-1].name if levels else "unknown"
    caps = [f"{key}={os.environ[key]}" for key in VECTOR_LEVELS[0].cap() if key in os.environ]
    return f"CPU vector level {top}" + (f", capped by {' '.join(caps)}" if caps else "")


class SelfCheckFailed(StartRefused):
    """A deterministic engine's kind gave other bits for the same row at other positions of
    its tile: its answers would depend on the batch, which the mode promises they do not."""


Compute = Callable[[Derivative, np.ndarray, np.ndarray | None], Outputs]


def verify(
    compute: Compute,
    kind: Derivative,
    rows: int,
    input_shape: Shape,
    vector_shape: Shape | None,
    dtype: np.dtype,
    model: str,
) -> None:
    """Compute one tile of `rows` copies of one random row (and vector) with `compute`;
    raise SelfCheckFailed naming the positions whose bits differ from position 0."""
    rng = np.random.default_rng(SEED)
    x = np.repeat(rng.standard_normal((1, *input_shape)).astype(dtype), rows, axis=0)
    v = None
    if vector_shape is not None:
        v = np.repeat(rng.standard_normal((1, *vector_shape)).astype(dtype), rows, axis=0)
    positions = differing_positions(compute(kind, x, v))
    if positions:
        raise SelfCheckFailed(
            f"--deterministic on cannot keep its promise for model {model!r} on this machine "
            f"({describe_cpu()}): {kind.value} computed the same row with other bits at "
            f"position{'s' * (len(positions) > 1)} {_ranges(positions)} of its {rows}-row "
            "tile than at position 0, so "
            "its answers would depend on the batch. Serve with --deterministic off (answers "
            "then agree to a few ulp across batches), or cap the kernels' vector level, e.g. "
            f"{' '.join(f'{k}={v}' for k, v in VECTOR_LEVELS[1].cap().items())}, and start "
            "again: the check runs at every start."
        )


def differing_positions(outputs: Outputs) -> list[int]:
    """The rows of an answer whose outputs or derivative differ in any bit from row 0."""
    arrays = [outputs.y] if outputs.dy_dx is None else [outputs.y, outputs.dy_dx]
    n = outputs.y.shape[0]
    as_bytes = np.concatenate(
        [np.ascontiguousarray(a).reshape(n, -1).view(np.uint8) for a in arrays], axis=1
    )
    return np.flatnonzero((as_bytes != as_bytes[0]).any(axis=1)).tolist()


def _ranges(positions: list[int]) -> str:
    """[5, 6, 7, 30] -> '5-7, 30'."""
    spans: list[list[int]] = []
    for p in positions:
        if spans and p == spans[-1][1] + 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
