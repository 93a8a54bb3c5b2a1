"""The torch backend: a Keras 3 model file loaded with Keras on PyTorch, or a native PyTorch
program (`torch.export.save`, a `.pt2` file), differentiated with `torch.func`.

Both are one function f: x [n, *X] -> y [n, *Y] whose rows are independent, and every kind
is built from f alone, as the other backends build theirs: the gradient and a VJP are one
pullback, a JVP one forward-mode pass, the Jacobian one pullback per output value and the
Hessian one forward-over-reverse pass per input value, each over the whole batch at once.

- A Keras file is called as the model itself under `torch.inference_mode(False)`, never
  through `torch.func.functional_call` (which gives Keras layers zero gradients) nor
  `predict` (which runs under `no_grad`). Keras chooses its backend once per process, when
  first imported: the process must set KERAS_BACKEND=torch before that (`startup` does,
  for --backend torch).
- A `.pt2` program is called as its module; its one input's per-row shape and dtype and its
  one output's shape and name come from its signature. Its batch dimension must have been
  exported as dynamic, or it would serve one batch size only.

Deterministic engines compute every batch as tiles of TILE_ROWS rows, one after another,
with `torch.use_deterministic_algorithms(True)`; the start-up self-check proves on this
machine that a row's bits do not depend on its place in a tile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradserve.server.core.contract import ENGINE_KINDS, Outputs, Shape
from gradserve.server.engine import batching, portability
from gradserve.server.engine.batching import TILE_ROWS
from gradserve.server.engine.errors import ModelError, row_shapes
from gradserve.wire.kinds import Derivative

BACKEND = "torch"
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
PROGRAM_SUFFIX = ".pt2"
_EXPORT_HINT = (
    "export it with a dynamic batch dimension, e.g. torch.export.export(module, (x,), "
    "dynamic_shapes={{'{name}': {{0: torch.export.Dim('batch')}}}})"
)


class TorchEngine:
    """A loaded model with one derivative function per kind, on one PyTorch device."""

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
        if input_name or output_name:
            raise ModelError("--input and --output choose a SavedModel's tensors: the torch "
                             "backend serves Keras files and .pt2 programs, which have one "
                             "input and one output")  # fmt: skip
        self.device_handle = resolve_device(device)
        self.device = str(self.device_handle)
        self.name = name or path.stem
        self.xla = False  # `xla` is TensorFlow's choice; PyTorch runs eagerly here
        self.max_batch_size = max_batch_size
        self.tile = TILE_ROWS if deterministic else 0
        self.ladder: list[int] = []  # any batch size runs as it comes (in tiles, deterministic)
        if deterministic:
            torch.use_deterministic_algorithms(True)
        if path.suffix == PROGRAM_SUFFIX:
            self.model, self.input_shape, self.output_shape, self.dtype = _load_program(
                path, self.device_handle
            )
        else:
            self.model, self.input_shape, self.output_shape, self.dtype = _load_keras(path, unsafe)
        self._torch_dtype = torch.from_numpy(np.zeros(0, self.dtype)).dtype
        self._functions = _kinds(self._forward, self.output_shape, self.input_shape)
        self._checked: set[Derivative] = set()  # kinds whose tile passed the self-check

    @property
    def deterministic(self) -> bool:
        return bool(self.tile)

    @property
    def numpy_dtype(self) -> np.dtype:
        return self.dtype

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

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
        step = self.tile or rows
        parts = []
        with torch.inference_mode(False), torch.enable_grad():
            for start in range(0, rows, step):
                tensors = [self._tensor(a[start : start + step]) for a in args]
                parts.append([_host(r) for r in self._functions[kind](*tensors)])
        results = [np.concatenate(column)[:n] if len(parts) > 1 else column[0][:n]
                   for column in zip(*parts, strict=True)]  # fmt: skip
        return Outputs(results[0], results[1] if len(results) > 1 else None)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device_handle)

    def rows_computed(self, kind: Derivative, n: int) -> int:
        """The rows a call with n rows computes: n, or deterministic, whole tiles."""
        return batching.rows_computed(n, self.ladder, self.tile)

    def warm_up(self, kinds=ENGINE_KINDS) -> float:
        """Run every kind once (a tile, deterministic); returns seconds. A deterministic
        engine self-checks each kind here, on its first call (SelfCheckFailed)."""
        return batching.warm_up(self, kinds, lambda kind: [max(1, self.tile)])


def _host(result: torch.Tensor) -> np.ndarray:
    """A result as a numpy array of its own, off the autograd graph and the device."""
    return result.detach().to("cpu").numpy().copy()


def _kinds(f, output_shape: Shape, input_shape: Shape) -> dict:
    """Each kind as a function of (x[, v]) -> (y, derivative): per-row derivatives of a
    model whose rows are independent (the gradient and Hessian of the sum of the outputs),
    as the other backends compute them."""
    outputs = int(np.prod(output_shape, dtype=np.int64))
    inputs = int(np.prod(input_shape, dtype=np.int64))

    def value(x):
        with torch.no_grad():
            return (f(x),)

    def gradient(x):
        y, pullback = torch.func.vjp(f, x)
        return y, pullback(torch.ones_like(y))[0]

    def vjp(x, v):
        y, pullback = torch.func.vjp(f, x)
        return y, pullback(v)[0]

    def jvp(x, u):
        return torch.func.jvp(f, (x,), (u,))

    def jacobian(x):
        y, pullback = torch.func.vjp(f, x)
        n = x.shape[0]
        columns = []
        for index in range(outputs):  # one pullback per output value, all rows at once
            cotangent = torch.zeros((n, outputs), dtype=y.dtype, device=y.device)
            cotangent[:, index] = 1
            columns.append(pullback(cotangent.reshape(y.shape))[0])
        return y, torch.stack(columns, dim=1).reshape(n, *output_shape, *input_shape)

    summed_gradient = torch.func.grad(lambda x: f(x).sum())

    def hessian(x):
        n = x.shape[0]
        columns = []
        for index in range(inputs):  # forward over reverse, one input value at a time
            tangent = torch.zeros((n, inputs), dtype=x.dtype, device=x.device)
            tangent[:, index] = 1
            columns.append(torch.func.jvp(summed_gradient, (x,), (tangent.reshape(x.shape),))[1])
        stacked = torch.stack(columns, dim=-1).reshape(n, *input_shape, *input_shape)
        return value(x)[0], stacked

    def hvp(x, v):
        return value(x)[0], torch.func.jvp(summed_gradient, (x,), (v,))[1]

    return {
        Derivative.NONE: value,
        Derivative.GRADIENT: gradient,
        Derivative.JACOBIAN: jacobian,
        Derivative.VJP: vjp,
        Derivative.JVP: jvp,
        Derivative.HESSIAN: hessian,
        Derivative.HVP: hvp,
    }


def _load_keras(path: Path, unsafe: bool):
    """A Keras file on Keras's torch backend: the model (called with x), its shapes and
    dtype. Keras puts its variables on KERAS_TORCH_DEVICE (`startup` sets it from --device)."""
    import keras

    if keras.backend.backend() != BACKEND:
        raise ModelError(
            f"Keras runs on {keras.backend.backend()} in this process; the torch backend "
            "needs KERAS_BACKEND=torch set before Keras is first imported (gradserve serve "
            "--backend torch does)"
        )
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelError(
            f"{path}: a SavedModel is TensorFlow's own format; serve it with --backend "
            "tensorflow (the torch backend reads .keras, .h5 and .pt2 files)"
        )
    if path.suffix not in KERAS_SUFFIXES:
        raise ModelError(f"{path}: expected a .keras, .h5 or .pt2 file")
    portability.check(path, BACKEND)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as exc:
        raise portability.load_failure(path, BACKEND, exc) from exc
    input_shape, output_shape = row_shapes(model)

    def call(x: torch.Tensor) -> torch.Tensor:
        return model(x, training=False)

    return call, input_shape, output_shape, np.dtype(model.inputs[0].dtype)


def _load_program(path: Path, device: torch.device):
    """A `.pt2` program: its module (on `device`), its one input's and output's per-row
    shapes, and its input dtype; ModelError, saying how to export it, otherwise."""
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelError(f"cannot load the PyTorch program {path}: {exc}") from exc
    signature = program.graph_signature
    inputs, outputs = list(signature.user_inputs), list(signature.user_outputs)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"{path}: the program takes {len(inputs)} input(s) and returns {len(outputs)} "
            "output(s); gradserve serves one input tensor [n, *X] and one output [n, *Y]"
        )
    nodes = {node.name: node for node in program.graph.nodes}
    given = nodes[inputs[0]].meta.get("val")
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    returned = output_node.args[0][0].meta.get("val")
    if not isinstance(given, torch.Tensor) or not isinstance(returned, torch.Tensor):
        raise ModelError(f"{path}: its input and output must each be one tensor")
    hint = _EXPORT_HINT.format(name=inputs[0])
    if len(given.shape) < 2 or isinstance(given.shape[0], int):
        raise ModelError(
            f"{path}: its input has the fixed shape {list(given.shape)}, so it serves one batch "
            f"size only; {hint}"
        )
    if any(not isinstance(d, int) for d in given.shape[1:]) or any(
        not isinstance(d, int) for d in returned.shape[1:]
    ):
        raise ModelError(f"{path}: only the batch dimension may be dynamic ({hint})")
    if not given.dtype.is_floating_point:
        raise ModelError(f"{path}: its input is {given.dtype}, which has no derivative")
    module = program.module().to(device)
    input_shape = tuple(int(d) for d in given.shape[1:])
    output_shape = tuple(int(d) for d in returned.shape[1:])
    dtype = np.dtype(str(given.dtype).removeprefix("torch."))
    return module, input_shape, output_shape, dtype


def resolve_device(spec: str) -> torch.device:
    """Map `auto`, `cpu`, `gpu:N` or `cuda[:N]` to a PyTorch device that exists here."""
    spec = spec.strip().lower()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return torch.device("cuda:0" if gpus else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    for prefix in ("gpu:", "cuda:"):
        if spec.startswith(prefix) and spec[len(prefix) :].isdigit():
            index = int(spec[len(prefix) :])
            if index >= gpus:
                raise ModelError(f"device {spec!r} requested but PyTorch sees {gpus} GPU(s)")
            return torch.device(f"cuda:{index}")
    if spec == "cuda":
        if not gpus:
            raise ModelError("device 'cuda' requested but PyTorch sees no GPU")
        return torch.device("cuda:0")
    raise ModelError(f"device must be auto, cpu, gpu:N or cuda[:N], got {spec!r}")
