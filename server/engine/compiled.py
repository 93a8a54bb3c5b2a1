"""The engine: the only serving module that imports TensorFlow.

It loads a trained model once (Keras `.keras` or legacy `.h5`, or a TensorFlow SavedModel),
places it on one device and builds one compiled function per derivative kind. Nothing here
re-initialises or copies weights: the functions close over the loaded model's own variables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from gradserve.server.core.contract import ENGINE_KINDS, Derivative, Outputs, Shape

XLA_KINDS = (Derivative.NONE, Derivative.GRADIENT, Derivative.JACOBIAN)


class ModelError(ValueError):
    """The model cannot be served (unreadable, unsupported, ambiguous)."""


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


class _Compiled:
    """A concrete function called through its compiled graph function directly.

    The public call of a concrete function binds and type-checks its arguments in Python on
    every call; that cost more than the bundled model itself (batch 8, XLA: 133 us per call
    against 60 us this way). The engine builds its arguments itself, always of the traced
    dtype and rank, so the checks add nothing. Falls back to the public call if this
    TensorFlow has no such graph function.
    """

    def __init__(self, concrete) -> None:
        self.concrete = concrete
        graph_fn = getattr(concrete, "_inference_function", None)
        self._call_flat = getattr(graph_fn, "call_flat", None)

    def __call__(self, *args: tf.Tensor) -> list[tf.Tensor]:
        if self._call_flat is None:
            return list(self.concrete(*args))
        return self._call_flat(*args, *self.concrete.captured_inputs)


class _Forward:
    """A differentiable map from a batch x [n, *X] to y [n, *Y], whatever the file format."""

    def __init__(self, fn: Callable, input_shape: Shape, output_shape: Shape, dtype) -> None:
        self.fn, self.input_shape, self.output_shape = fn, input_shape, output_shape
        self.dtype = dtype


def _load(path: Path, *, unsafe: bool, input_name: str | None, output_name: str | None):
    if path.is_dir():
        return _load_saved_model(path, input_name, output_name)
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelError(f"{path}: expected a .keras or .h5 file, or a SavedModel directory")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as exc:
        hint = " (Lambda layers need --unsafe-deserialization)" if "Lambda" in str(exc) else ""
        raise ModelError(f"cannot load {path}: {exc}{hint}") from exc
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(
            f"model must have one input and one output, has {len(model.inputs)} "
            f"and {len(model.outputs)}"
        )
    in_shape, out_shape = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)
    if None in in_shape[1:] or None in out_shape[1:] or len(in_shape) < 2:
        raise ModelError(
            f"model must map [n, *X] to [n, *Y] with fixed X and Y; its input is {in_shape}, "
            f"its output {out_shape}"
        )
    dtype = tf.as_dtype(model.inputs[0].dtype)
    forward = _Forward(lambda x: model(x, training=False), in_shape[1:], out_shape[1:], dtype)
    return forward, model


def _load_saved_model(path: Path, input_name: str | None, output_name: str | None):
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ModelError(f"cannot load SavedModel {path}: {exc}") from exc
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ModelError(f"SavedModel {path} has no serving_default signature")
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    name_in = _choose("input", inputs, input_name, "--input")
    name_out = _choose("output", outputs, output_name, "--output")
    spec_in, spec_out = inputs[name_in], outputs[name_out]
    if not spec_in.dtype.is_floating:
        raise ModelError(
            f"SavedModel input {name_in!r} is {spec_in.dtype.name}: not differentiable"
        )
    in_shape, out_shape = tuple(spec_in.shape), tuple(spec_out.shape)
    if None in in_shape[1:] or None in out_shape[1:]:
        raise ModelError(
            f"SavedModel signature shapes must be fixed per row: {in_shape}, {out_shape}"
        )

    def fn(x):
        return signature(**{name_in: x})[name_out]

    forward = _Forward(fn, in_shape[1:], out_shape[1:], spec_in.dtype)
    _check_differentiable(forward, path)
    return forward, loaded


def _choose(what: str, specs: dict, chosen: str | None, flag: str) -> str:
    names = sorted(specs)
    if chosen is not None:
        if chosen not in specs:
            raise ModelError(f"the signature has no {what} {chosen!r}; it has {names}")
        return chosen
    if len(names) != 1:
        raise ModelError(f"the signature has {what}s {names}: choose one with {flag}")
    return names[0]


def _check_differentiable(forward: _Forward, path: Path) -> None:
    x = tf.zeros((1, *forward.input_shape), forward.dtype)
    try:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward.fn(x)
    except Exception as exc:
        raise ModelError(
            f"SavedModel {path}: its signature cannot be called with only that input: {exc}"
        ) from exc
    if tape.gradient(y, x) is None:
        raise ModelError(f"SavedModel {path}: its output is not differentiable in its input")


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
        unsafe: bool = False,
        input_name: str | None = None,
        output_name: str | None = None,
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
            forward, self.model = _load(
                path, unsafe=unsafe, input_name=input_name, output_name=output_name
            )
        self._f = forward.fn
        self.input_shape: Shape = tuple(int(d) for d in forward.input_shape)
        self.output_shape: Shape = tuple(int(d) for d in forward.output_shape)
        self.dtype = forward.dtype
        self._functions = self._compile()

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype.as_numpy_dtype)

    def _compile(self) -> dict:
        """One concrete function per kind (calling those skips tf.function's per-call
        signature matching, which costs more than a small model itself).

        XLA (when on) compiles the three common kinds, once per ladder size; the others
        trace once for any batch size, which keeps warm-up short.
        """
        x = tf.TensorSpec([None, *self.input_shape], self.dtype)
        y = tf.TensorSpec([None, *self.output_shape], self.dtype)
        bodies = {
            Derivative.NONE: (self._outputs, [x]),
            Derivative.GRADIENT: (self._gradient, [x]),
            Derivative.JACOBIAN: (self._jacobian, [x]),
            Derivative.VJP: (self._vjp, [x, y]),
            Derivative.JVP: (self._jvp, [x, x]),
            Derivative.HESSIAN: (self._hessian, [x]),
            Derivative.HVP: (self._hvp, [x, x]),
        }
        with tf.device(self.device):
            return {
                kind: _Compiled(
                    tf.function(
                        body, input_signature=spec, jit_compile=self._uses_xla(kind)
                    ).get_concrete_function()
                )
                for kind, (body, spec) in bodies.items()
            }

    def _uses_xla(self, kind: Derivative) -> bool:
        return self.xla and kind in XLA_KINDS

    def _outputs(self, x):
        return (self._f(x),)

    def _gradient(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = self._f(x)
        return y, tape.gradient(y, x)

    def _jacobian(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = self._f(x)
        return y, tape.batch_jacobian(y, x)

    def _vjp(self, x, v):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = self._f(x)
        return y, tape.gradient(y, x, output_gradients=v)

    def _jvp(self, x, u):
        with tf.autodiff.ForwardAccumulator(x, u) as acc:
            y = self._f(x)
        return y, acc.jvp(y)

    def _hessian(self, x):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = self._f(x)
            g = inner.gradient(y, x)
        return y, outer.batch_jacobian(g, x)

    def _hvp(self, x, v):
        """Forward-over-reverse: the directional derivative of the gradient along v."""
        with tf.autodiff.ForwardAccumulator(x, v) as acc:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = self._f(x)
            g = tape.gradient(y, x)
        return y, acc.jvp(g)

    def run(self, kind: Derivative, x: np.ndarray, v: np.ndarray | None = None) -> Outputs:
        """Compute y (and the derivative `kind`) for rows x [n, *X] (v: the kind's vector).

        More rows than max_batch_size run in several calls (the batcher never sends
        that many; direct callers such as the benchmark may).
        """
        n = x.shape[0]
        if n > self.max_batch_size:
            step = self.max_batch_size
            parts = [
                self.run(kind, x[i : i + step], None if v is None else v[i : i + step])
                for i in range(0, n, step)
            ]
            dy_dx = None if parts[0].dy_dx is None else np.concatenate([p.dy_dx for p in parts])
            return Outputs(np.concatenate([p.y for p in parts]), dy_dx)
        pad = self._uses_xla(kind)
        args = [tf.constant(self._pad(x, pad))]
        if kind.needs_vector:
            if v is None:
                raise ValueError(f"{kind.value} needs a vector v")
            args.append(tf.constant(self._pad(v, pad)))
        results = self._functions[kind](*args)
        y = results[0].numpy()[:n]
        dy_dx = results[1].numpy()[:n] if len(results) > 1 else None
        return Outputs(y, dy_dx)

    def _pad(self, a: np.ndarray, pad: bool) -> np.ndarray:
        """With XLA, pad rows up to the next ladder size so no new shape is ever compiled."""
        a = np.asarray(a, dtype=self.numpy_dtype)
        if not pad:
            return a
        n = a.shape[0]
        size = next(s for s in self.ladder if s >= n)
        if size == n:
            return a
        padded = np.zeros((size, *a.shape[1:]), dtype=a.dtype)
        padded[:n] = a
        return padded

    def warm_up(self, kinds=ENGINE_KINDS) -> float:
        """Trace (and with XLA compile) every function at every batch shape; returns seconds."""
        start = time.perf_counter()
        for kind in kinds:
            sizes = self.ladder if self._uses_xla(kind) else [1]
            for size in sizes:
                x = np.zeros((size, *self.input_shape), self.numpy_dtype)
                v_shape = self.output_shape if kind is Derivative.VJP else self.input_shape
                v = np.zeros((size, *v_shape), self.numpy_dtype) if kind.needs_vector else None
                self.run(kind, x, v)
        return time.perf_counter() - start
