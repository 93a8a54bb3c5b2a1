"""The derivative kinds: their names, what each takes, and the options of the explanations.

One table for the server, which computes the kinds, and for the SDK, which asks for them.
The standard protocol names a kind by its value ("gradient") in the `derivative` parameter;
the native protocol's `Derivative` enum numbers the kinds under the same names
(`gradserve.wire.native`). Plain Python: no protobuf, no gRPC, so the server's core may use it.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class Derivative(enum.Enum):
    """What to compute alongside the model's output y, for rows x of per-row shape X
    (outputs of per-row shape Y). Shapes below are per row; the order is the native enum's."""

    GRADIENT = "gradient"  # d(sum of y)/dx: X
    JACOBIAN = "jacobian"  # dy/dx: Y + X
    NONE = "none"  # y only
    VJP = "vjp"  # v^T (dy/dx) for a cotangent v of shape Y: X
    JVP = "jvp"  # (dy/dx) u for a tangent u of shape X, forward mode: Y
    HESSIAN = "hessian"  # d2(sum of y)/dx2: X + X
    HVP = "hvp"  # (d2(sum of y)/dx2) v for v of shape X: X
    # Explanations: expanded into many gradient (or one-hot VJP) rows, reduced per row.
    INTEGRATED_GRADIENTS = "integrated_gradients"  # (x - baseline) * path-mean gradient: X
    SMOOTH_GRAD = "smooth_grad"  # mean gradient over noisy copies of x: X

    @property
    def needs_vector(self) -> bool:
        """Kinds that take a vector v with every row (one, or k per row)."""
        return self in (Derivative.VJP, Derivative.JVP, Derivative.HVP)

    @property
    def explains(self) -> bool:
        """An explanation kind: never computed by the engine itself, only through its rows."""
        return self in EXPLANATIONS

    @property
    def takes_target(self) -> bool:
        """Kinds whose differentiated scalar may be one output (`target`) instead of the sum."""
        return self in (Derivative.GRADIENT, *EXPLANATIONS)

    @property
    def options(self) -> tuple[Option, ...]:
        """The explanation options this kind takes (none for the other kinds)."""
        return OPTIONS.get(self, ())

    @classmethod
    def named(cls, name: str) -> Derivative | None:
        """The kind of a name as the protocols write it (any case), or None."""
        return _BY_NAME.get(name.lower())


EXPLANATIONS = (Derivative.INTEGRATED_GRADIENTS, Derivative.SMOOTH_GRAD)
_BY_NAME = {kind.value: kind for kind in Derivative}


class Option(NamedTuple):
    """One option of an explanation kind, named alike in every protocol: the native `Explain`
    message's field, the standard protocol's request parameter (or input tensor), the SDK's
    keyword. `type` is None for a tensor."""

    name: str
    type: type | None
    default: object


DEFAULT_STEPS = 64  # integrated gradients: Simpson-rule intervals on the path
DEFAULT_SAMPLES = 32  # smooth_grad: noisy copies of each row
DEFAULT_NOISE = 0.1  # smooth_grad: sigma, as a fraction of each row's range

BASELINE = Option("baseline", None, None)  # [1, *X] or [n, *X]; None: zeros
OPTIONS = {
    Derivative.INTEGRATED_GRADIENTS: (BASELINE, Option("steps", int, DEFAULT_STEPS)),
    Derivative.SMOOTH_GRAD: (
        Option("samples", int, DEFAULT_SAMPLES),
        Option("noise", float, DEFAULT_NOISE),
        Option("noise_absolute", bool, False),
        Option("seed", int, 0),
    ),
}
# Not an explanation option: which output to differentiate, for the kinds that take_target.
TARGET = Option("target", int, None)


def takers(option: str) -> tuple[Derivative, ...]:
    """The kinds that take the option (or `target`) named `option`."""
    if option == TARGET.name:
        return tuple(kind for kind in Derivative if kind.takes_target)
    return tuple(kind for kind in Derivative if option in (o.name for o in kind.options))
