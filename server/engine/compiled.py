"""The engine: a loaded model on one device with one compiled function per derivative kind.

The functions close over the loaded model's own variables (see loading.py); with XLA, every
batch shape they are called with is one of a ladder compiled at warm-up. Deterministic
engines compute every batch as fixed tiles of TILE_ROWS rows, one after another inside one
function, so that a row's bits never depend on the batch it came in (docs/architecture.md),
and check on this machine, before a kind answers anyone, that a tile's positions all compute
alike (core/selfcheck.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from gradserve.server.core.contract import ENGINE_KINDS, Outputs, Shape
from gradserve.server.engine import batching
from gradserve.server.engine.batching import TILE_ROWS
from gradserve.server.engine.devices import resolve_device
from gradserve.server.engine.loading import ModelError, load
from gradserve.wire.kinds import Derivative

XLA_KINDS = (Derivative.NONE, Derivative.GRADIENT, Derivative.JACOBIAN)


# A derivative of what does not depend on x is zero, not missing: a model linear in x has a
# zero Hessian (TensorFlow would give None).
_ZERO = tf.UnconnectedGradients.ZERO


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


class TensorFlowEngine:
    """A loaded model with compiled output/derivative functions on one device."""

    in_flight = 0  # run is a blocking call (the batcher runs it on a thread)
    takes_hints = False

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
        deterministic: bool = False,
    ) -> None:
        path = Path(model_path)
        if not path.exists():
            raise ModelError(f"model file {path} does not exist")
        self.device = resolve_device(device)
        self.name = name or path.stem
        self.xla = xla
        self.max_batch_size = max_batch_size
        self.tile = TILE_ROWS if deterministic else 0
        if deterministic and "GPU" in self.device.upper():
            tf.config.experimental.enable_op_determinism()  # no kernels that sum by atomics
        self.ladder = batching.ladder(max_batch_size, self.tile) if xla else []
        with tf.device(self.device):
            forward, self.model = load(
                path, unsafe=unsafe, input_name=input_name, output_name=output_name
            )
        self._f = forward.fn
        self.input_shape: Shape = tuple(int(d) for d in forward.input_shape)
        self.output_shape: Shape = tuple(int(d) for d in forward.output_shape)
        self.dtype = forward.dtype
        self._functions = self._compile()
        self._checked: set[Derivative] = set()  # kinds whose tile passed the self-check

    @property
    def deterministic(self) -> bool:
        return bool(self.tile)

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype.as_numpy_dtype)

    def _compile(self) -> dict:
        """One concrete function per kind (calling those skips tf.function's per-call
        signature matching, which costs more than a small model itself).

        XLA (when on) compiles the three common kinds, once per ladder size; the others
        trace once for any batch size, which keeps warm-up short. A deterministic engine
        wraps every body in the loop over tiles.
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
                        self._tiled(body, kind) if self.tile else body,
                        input_signature=spec,
                        jit_compile=self._uses_xla(kind),
                    ).get_concrete_function()
                )
                for kind, (body, spec) in bodies.items()
            }

    def _uses_xla(self, kind: Derivative) -> bool:
        return self.xla and kind in XLA_KINDS

    def _tiled(self, body, kind: Derivative):
        """`body` applied to tiles of `self.tile` rows in turn, the results joined again.

        Kernels (oneDNN, Eigen, XLA) choose their blocking and summation order by the
        batch dimension, so a row alone and the same row among 31 others could differ in
        the last bits. Here every kernel sees one shape, [tile, ...], whatever the batch;
        one tile at a time (parallel_iterations=1) also keeps each tile's threads the same.
        Inputs come padded to a multiple of the tile (`run`).
        """
        tile = self.tile
        signature = (self.dtype,) if kind is Derivative.NONE else (self.dtype, self.dtype)

        def fn(*args):
            tiles = tuple(tf.reshape(a, [-1, tile, *a.shape[1:]]) for a in args)
            results = tf.map_fn(
                lambda t: body(*map(_any_rows, t)),
                tiles,
                fn_output_signature=signature,
                parallel_iterations=1,
            )
            return tuple(tf.reshape(r, [-1, *r.shape[2:]]) for r in results)

        return fn

    def _outputs(self, x):
        return (self._f(x),)

    def _gradient(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = self._f(x)
        return y, tape.gradient(y, x, unconnected_gradients=_ZERO)

    def _jacobian(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = self._f(x)
        return y, tape.batch_jacobian(y, x, unconnected_gradients=_ZERO)

    def _vjp(self, x, v):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = self._f(x)
        return y, tape.gradient(y, x, output_gradients=v, unconnected_gradients=_ZERO)

    def _jvp(self, x, u):
        with tf.autodiff.ForwardAccumulator(x, u) as acc:
            y = self._f(x)
        return y, acc.jvp(y, unconnected_gradients=_ZERO)

    def _hessian(self, x):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = self._f(x)
            g = inner.gradient(y, x, unconnected_gradients=_ZERO)
        return y, outer.batch_jacobian(g, x, unconnected_gradients=_ZERO)

    def _hvp(self, x, v):
        """Forward-over-reverse: the directional derivative of the gradient along v."""
        with tf.autodiff.ForwardAccumulator(x, v) as acc:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = self._f(x)
            g = tape.gradient(y, x, unconnected_gradients=_ZERO)
        return y, acc.jvp(g, unconnected_gradients=_ZERO)

    def batch_cap(self, kind: Derivative) -> int | None:
        """None: it computes a batch of any size it is given, in one call."""
        return None

    def run(self, kind: Derivative, x: np.ndarray, v: np.ndarray | None = None) -> Outputs:
        """Compute y (and the derivative `kind`) for rows x [n, *X] (v: the kind's vector).

        More rows than max_batch_size run in several calls (the batcher never sends
        that many; direct callers such as the benchmark may). A deterministic engine's first
        call of a kind runs the kind's self-check first (SelfCheckFailed: it cannot keep its
        promise here), so no answer of a kind ever comes before its check passed.
        """
        return batching.run_checked(self, self._call, self._checked, kind, x, v)

    def _call(self, kind: Derivative, x: np.ndarray, v: np.ndarray | None = None) -> Outputs:
        """One call of the kind's compiled function, x (and v) padded to the rows it computes."""
        n = x.shape[0]
        rows = self.rows_computed(kind, n)
        args = [tf.constant(a) for a in batching.padded(kind, x, v, rows, self.numpy_dtype)]
        results = self._functions[kind](*args)
        y = _owned(results[0], n)
        dy_dx = _owned(results[1], n) if len(results) > 1 else None
        return Outputs(y, dy_dx)

    def rows_computed(self, kind: Derivative, n: int) -> int:
        """The rows a call of `kind` with n rows computes: with XLA the next ladder size,
        so no new shape is ever compiled; deterministic, a whole number of tiles."""
        return batching.rows_computed(n, self.ladder if self._uses_xla(kind) else [], self.tile)

    def warm_up(self, kinds=ENGINE_KINDS) -> float:
        """Trace (and with XLA compile) every function at every batch shape; returns seconds.
        A deterministic engine self-checks each kind here, on its first call
        (SelfCheckFailed)."""
        return batching.warm_up(
            self, kinds, lambda kind: self.ladder if self._uses_xla(kind) else [max(1, self.tile)]
        )


def _any_rows(tile: tf.Tensor) -> tf.Tensor:
    """The tile, its row count unknown to the graph (it is always TILE_ROWS when run).

    TensorFlow traces each op's forward-mode derivative (jvp, hvp) once per shape and reuses a
    trace made for a more general shape: with the tile's exact shape, a model's JVPs took
    another graph, and other bits, when an engine with unknown batch sizes had been traced
    before it in the process (measured: other JVP and HVP bits after one such engine of the
    same model). With the rows unknown, as every engine's are, the graph never depends on
    what the process traced before.
    """
    return tf.compat.v1.placeholder_with_default(tile, [None, *tile.shape[1:]])


def _owned(tensor: tf.Tensor, n: int) -> np.ndarray:
    """The first n rows of an output as an array of its own. `.numpy()` views TensorFlow's
    buffer, which would then live, padding included, as long as any request's answer from
    the batch: TensorFlow's allocator keeps what it grew to, so buffers held across batches
    made it grow with the traffic. A copy of the rows frees the buffer for the next batch."""
    return np.array(tensor.numpy()[:n])
