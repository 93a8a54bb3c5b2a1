"""What the layers agree on: derivative kinds, engine outputs, the served model's shape.

Free of TensorFlow and protobuf, so every layer can import it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Derivative(enum.Enum):
    """What to compute alongside the model's output y for rows x of shape [n, d]."""

    NONE = "none"  # y only
    GRADIENT = "gradient"  # d(sum of outputs)/dx per row: [n, d]
    JACOBIAN = "jacobian"  # dy/dx per row: [n, m, d]


class Outputs(NamedTuple):
    """One engine call's results: y [n, m] and dy_dx (None for Derivative.NONE)."""

    y: np.ndarray
    dy_dx: np.ndarray | None


@dataclass(frozen=True)
class ModelSpec:
    """What the servicers need to know of the served model, without TensorFlow."""

    name: str
    version: str
    input_width: int
    output_width: int
    device: str
    max_batch_size: int
    max_request_rows: int
