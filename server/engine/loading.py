"""Reading a trained model: a Keras `.keras` or legacy `.h5` file, or a TensorFlow SavedModel,
as one differentiable map from a batch of rows to a batch of outputs.

The model's own variables are used as loaded: nothing is re-initialised or copied.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

from gradserve.server.core.contract import Shape
from gradserve.server.engine import portability
from gradserve.server.engine.errors import ModelError, row_shapes


class Forward:
    """A differentiable map from a batch x [n, *X] to y [n, *Y], whatever the file format."""

    def __init__(self, fn: Callable, input_shape: Shape, output_shape: Shape, dtype) -> None:
        self.fn, self.input_shape, self.output_shape = fn, input_shape, output_shape
        self.dtype = dtype


def load(
    path: Path, *, unsafe: bool, input_name: str | None, output_name: str | None
) -> tuple[Forward, object]:
    """The model at `path` as a Forward, and the loaded object that owns its variables."""
    if path.is_dir():
        return _load_saved_model(path, input_name, output_name)
    if path.suffix == ".pt2":
        raise ModelError(f"{path}: a .pt2 file is a PyTorch program; serve it with --backend torch")
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelError(f"{path}: expected a .keras or .h5 file, or a SavedModel directory")
    portability.check(path, "tensorflow")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as exc:
        raise portability.load_failure(path, "tensorflow", exc) from exc
    in_shape, out_shape = row_shapes(model)
    dtype = tf.as_dtype(model.inputs[0].dtype)
    forward = Forward(lambda x: model(x, training=False), in_shape, out_shape, dtype)
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

    forward = Forward(fn, in_shape[1:], out_shape[1:], spec_in.dtype)
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


def _check_differentiable(forward: Forward, path: Path) -> None:
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
