"""The engine: the only serving module that imports TensorFlow.

It loads a trained Keras model once, places it on one device and builds one
compiled function per derivative kind. Nothing here re-initialises or copies
weights: the functions close over the loaded model's own variables.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from gradserve.server.contract import Derivative, Outputs


class ModelError(ValueError):
    """The model file cannot be served (unreadable, or not a [n, d] -> [n, m] network)."""


def resolve_device(spec: str) -> str:
    """Map `auto`, `cpu` or `gpu:N` to a TensorFlow device name that exists here."""
    spec = spec.strip().lower()
    gpus = tf.config.list_logical_devices("GPU")
    if spec == "auto":
        return gpus[0].name if gpus else "/device:CPU:0"
    if spec == "cpu":
        return "/device:CPU:0"
    if spec.startswith("gpu:") and spec[4:].isdigit():
        index = int(spec[4:])
        if index >= len(gpus):
            raise ModelError(f"device {spec!r} requested but TensorFlow sees {len(gpus)} GPU(s)")
        return gpus[index].name
    raise ModelError(f"device must be auto, cpu or gpu:N, got {spec!r}")


def batch_ladder(max_batch_size: int) -> list[int]:
    """Powers of two up to max_batch_size (inclusive): the only batch shapes XLA compiles."""
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(min(sizes[-1] * 2, max_batch_size))
    return sizes


class Engine:
    """A loaded model with compiled output/derivative functions on one device."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "auto",
        xla: bool = False,
        max_batch_size: int = 1024,
        name: str | None = None,
    ) -> None:
        path = Path(model_path)
        if not path.exists():
            raise ModelError(f"model file {path} does not exist")
        self.device = resolve_device(device)
        self.name = name or path.stem
        self.xla = xla
        self.max_batch_size = max_batch_size
        self.ladder = batch_ladder(max_batch_size) if xla else []
        with tf.device(self.device):
            try:
                self.model = keras.saving.load_model(path, compile=False, safe_mode=True)
            except Exception as exc:
                raise ModelError(f"cannot load {path}: {exc}") from exc
        self.input_width, self.output_width = _io_widths(self.model)
        spec = tf.TensorSpec([None, self.input_width], tf.float32)
        bodies = {
            Derivative.NONE: self._outputs,
            Derivative.GRADIENT: self._gradient,
            Derivative.JACOBIAN: self._jacobian,
        }
        # Concrete functions: calling them skips tf.function's per-call signature
        # matching, which costs more than the model itself at small batches.
        with tf.device(self.device):
            self._functions = {
                kind: tf.function(
                    body, input_signature=[spec], jit_compile=xla
                ).get_concrete_function()
                for kind, body in bodies.items()
            }

    def _outputs(self, x: tf.Tensor) -> tuple[tf.Tensor]:
        return (self.model(x, training=False),)

    def _gradient(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = self.model(x, training=False)
        return y, tape.gradient(y, x)

    def _jacobian(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = self.model(x, training=False)
        return y, tape.batch_jacobian(y, x)

    def run(self, kind: Derivative, x: np.ndarray) -> Outputs:
        """Compute y (and the derivative `kind`) for float32 rows x of shape [n, d].

        More rows than max_batch_size run in several calls (the batcher never sends
        that many; direct callers such as the benchmark may).
        """
        n = x.shape[0]
        if n > self.max_batch_size:
            parts = [
                self.run(kind, x[i : i + self.max_batch_size])
                for i in range(0, n, self.max_batch_size)
            ]
            dy_dx = None if parts[0].dy_dx is None else np.concatenate([p.dy_dx for p in parts])
            return Outputs(np.concatenate([p.y for p in parts]), dy_dx)
        results = self._functions[kind](tf.constant(self._pad(x)))
        y = results[0].numpy()[:n]
        dy_dx = results[1].numpy()[:n] if len(results) > 1 else None
        return Outputs(y, dy_dx)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        """With XLA, pad rows up to the next ladder size so no new shape is ever compiled."""
        if not self.xla:
            return x
        n = x.shape[0]
        size = next(s for s in self.ladder if s >= n)
        if size == n:
            return x
        padded = np.zeros((size, x.shape[1]), dtype=np.float32)
        padded[:n] = x
        return padded

    def warm_up(self) -> float:
        """Trace (and with XLA compile) every function at every batch shape; returns seconds."""
        start = time.perf_counter()
        sizes = self.ladder or sorted({1, self.max_batch_size})
        for kind in Derivative:
            for size in sizes:
                self.run(kind, np.zeros((size, self.input_width), dtype=np.float32))
        return time.perf_counter() - start


def _io_widths(model: keras.Model) -> tuple[int, int]:
    """Return (d, m) for a model mapping [n, d] to [n, m]; reject anything else."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(
            f"model must have one input and one output, has {len(model.inputs)} "
            f"and {len(model.outputs)}"
        )
    in_shape, out_shape = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)
    if len(in_shape) != 2 or len(out_shape) != 2 or None in (in_shape[1], out_shape[1]):
        raise ModelError(
            f"model must map [n, d] to [n, m]; its input is {in_shape}, its output {out_shape}"
        )
    return int(in_shape[1]), int(out_shape[1])
