"""The JAX backend: a Keras 3 model file loaded with Keras on JAX, differentiated as the pure
function `model.stateless_call(trainable, non_trainable, x)` with JAX's transforms, and
compiled (jit) once per batch size of a ladder at warm-up, as the TensorFlow engine with XLA.

Keras chooses its backend once per process, when first imported: the process must set
KERAS_BACKEND=jax before that (`startup` does, for --backend jax). The model's variables are
passed to each compiled function as arguments, never baked into it as constants.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import keras
import numpy as np

from gradserve.server.core.contract import ENGINE_KINDS, Outputs, Shape
from gradserve.server.engine import batching, portability
from gradserve.server.engine.batching import TILE_ROWS
from gradserve.server.engine.errors import ModelError, row_shapes
from gradserve.wire.kinds import Derivative

BACKEND = "jax"
# float64 models keep float64 (JAX narrows to float32 otherwise); float32 ones stay float32, as
# Keras gives every variable and the engine every input its model's dtype.
jax.config.update("jax_enable_x64", True)


class JaxEngine:
    """A loaded model with one compiled function per derivative kind, on one JAX device."""

    in_flight = 0  # run is a blocking call (the batcher runs it on a thread)
    takes_hints = False

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "auto",
        xla: bool = True,
        max_batch_size: int = 1024,
        name: str | None = None,
        unsafe: bool = False,
        input_name: str | None = None,
        output_name: str | None = None,
        deterministic: bool = False,
    ) -> None:
        if keras.backend.backend() != BACKEND:
            raise ModelError(
                f"Keras runs on {keras.backend.backend()} in this process; the jax backend "
                "needs KERAS_BACKEND=jax set before Keras is first imported (gradserve serve "
                "--backend jax does)"
            )
        path = Path(model_path)
        _check_format(path, input_name, output_name)
        self.device_handle = resolve_device(device)
        self.device = str(self.device_handle)
        self.name = name or path.stem
        self.xla = True  # JAX compiles every function; `xla` is TensorFlow's choice
        self.max_batch_size = max_batch_size
        self.tile = TILE_ROWS if deterministic else 0
        self.ladder = batching.ladder(max_batch_size, self.tile)
        self.model = _load(path, unsafe)
        shapes: tuple[Shape, Shape] = row_shapes(self.model)
        self.input_shape, self.output_shape = shapes
        self.dtype = np.dtype(self.model.inputs[0].dtype)
        self._params = jax.device_put(
            ([v.value for v in self.model.trainable_variables],
             [v.value for v in self.model.non_trainable_variables]),
            self.device_handle,
        )  # fmt: skip
        self._functions = {kind: jax.jit(self._tiled(fn) if self.tile else fn)
                           for kind, fn in _kinds(self.model).items()}  # fmt: skip
        self._checked: set[Derivative] = set()  # kinds whose tile passed the self-check

    @property
    def deterministic(self) -> bool:
        return bool(self.tile)

    @property
    def numpy_dtype(self) -> np.dtype:
        return self.dtype

    def _tiled(self, fn):
        """`fn` on one tile of `self.tile` rows after another (lax.map), the results joined:
        every compiled kernel sees [tile, ...] whatever the batch."""
        tile = self.tile

        def tiled(params, *args):
            tiles = tuple(a.reshape(-1, tile, *a.shape[1:]) for a in args)
            results = jax.lax.map(lambda t: fn(params, *t), tiles)
            return tuple(r.reshape(-1, *r.shape[2:]) for r in results)

        return tiled

    def batch_cap(self, kind: Derivative) -> int | None:
        """None: it computes a batch of any size it is given, in one call."""
        return None

    def run(self, kind: Derivative, x: np.ndarray, v: np.ndarray | None = None) -> Outputs:
        """Compute y (and the derivative `kind`) for rows x [n, *X] (v: the kind's vector);
        a deterministic engine's first call of a kind runs its self-check first."""
        return batching.run_checked(self, self._call, self._checked, kind, x, v)

    def _call(self, kind: Derivative, x: np.ndarray, v: np.ndarray | None = None) -> Outputs:
        n = x.shape[0]
        rows = self.rows_computed(kind, n)
        args = batching.padded(kind, x, v, rows, self.dtype)
        # numpy in: jit puts uncommitted arguments where the committed params are, cheaper
        # than a device_put of its own (tuning log 66)
        results = self._functions[kind](self._params, *args)
        dy_dx = _owned(results[1], n) if len(results) > 1 else None
        return Outputs(_owned(results[0], n), dy_dx)

    def rows_computed(self, kind: Derivative, n: int) -> int:
        """The next ladder size: JAX compiles one function per shape, all at warm-up."""
        return batching.rows_computed(n, self.ladder, self.tile)

    def warm_up(self, kinds=ENGINE_KINDS) -> float:
        """Compile every kind at every ladder size; returns seconds. A deterministic engine
        self-checks each kind here, on its first call (SelfCheckFailed)."""
        return batching.warm_up(self, kinds, lambda kind: self.ladder)


def _owned(result: jax.Array, n: int) -> np.ndarray:
    """The first n rows as an array of its own: the whole result to the host first (slicing
    on the device would be one more dispatched computation), then a copy of the rows."""
    return np.array(np.asarray(result)[:n])


def _kinds(model) -> dict:
    """Each kind as a pure function of (params, x[, v]) -> (y, derivative): per-row
    derivatives of a model whose rows are independent, as the TensorFlow engine computes
    them (the gradient and Hessian of the sum of the outputs)."""

    def f(params, x):
        return model.stateless_call(*params, x, training=False)[0]

    def row(params, r):
        return f(params, r[None])[0]

    def gradient(params, x):
        y, pullback = jax.vjp(lambda x: f(params, x), x)
        return y, pullback(jnp.ones_like(y))[0]

    def vjp(params, x, v):
        y, pullback = jax.vjp(lambda x: f(params, x), x)
        return y, pullback(v)[0]

    def jvp(params, x, u):
        return jax.jvp(lambda x: f(params, x), (x,), (u,))

    def jacobian(params, x):
        return f(params, x), jax.vmap(jax.jacrev(lambda r: row(params, r)))(x)

    def hessian(params, x):
        summed = jax.hessian(lambda r: jnp.sum(row(params, r)))
        return f(params, x), jax.vmap(summed)(x)

    def hvp(params, x, v):
        """Forward over reverse: the directional derivative of the gradient along v."""
        return f(params, x), jax.jvp(lambda x: gradient(params, x)[1], (x,), (v,))[1]

    return {
        Derivative.NONE: lambda params, x: (f(params, x),),
        Derivative.GRADIENT: gradient,
        Derivative.JACOBIAN: jacobian,
        Derivative.VJP: vjp,
        Derivative.JVP: jvp,
        Derivative.HESSIAN: hessian,
        Derivative.HVP: hvp,
    }


def _check_format(path: Path, input_name: str | None, output_name: str | None) -> None:
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelError(
            f"{path}: a SavedModel is TensorFlow's own format; serve it with --backend "
            "tensorflow (the jax backend reads .keras and .h5 files)"
        )
    if path.suffix == ".pt2":
        raise ModelError(f"{path}: a .pt2 file is a PyTorch program; serve it with --backend torch")
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelError(f"{path}: expected a .keras or .h5 file")
    if input_name or output_name:
        raise ModelError("--input and --output choose a SavedModel's tensors: the jax backend "
                         "serves Keras files, which have one input and one output")  # fmt: skip


def _load(path: Path, unsafe: bool):
    portability.check(path, BACKEND)
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as exc:
        raise portability.load_failure(path, BACKEND, exc) from exc


def resolve_device(spec: str):
    """Map `auto`, `cpu` or `gpu:N` to a JAX device that exists here."""
    spec = spec.strip().lower()
    gpus = _gpus()
    if spec == "auto":
        return gpus[0] if gpus else jax.devices("cpu")[0]
    if spec == "cpu":
        return jax.devices("cpu")[0]
    if spec.startswith("gpu:") and spec[4:].isdigit():
        index = int(spec[4:])
        if index >= len(gpus):
            raise ModelError(f"device {spec!r} requested but JAX sees {len(gpus)} GPU(s)")
        return gpus[index]
    raise ModelError(f"device must be auto, cpu or gpu:N, got {spec!r}")


def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU platform in this JAX
        return []
