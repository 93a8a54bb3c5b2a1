"""Train the bundled models: the network of the original K.gradients question.

Dense(32, act) -> Dense(32, act) -> Dense(1) on one input, fitted to
y = 4(x - 0.5)^2 on x = linspace(0, 1, 100), so dy/dx = 8(x - 0.5) and d2y/dx2 = 8.
`quadratic` uses relu (piecewise linear: its second derivative is 0 almost everywhere);
`quadratic_tanh` uses tanh, so second derivatives are meaningful. Offline tooling, never
imported by the serving path (see docs/architecture.md).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from gradserve.server.config import BUNDLED_DIR, BUNDLED_MODEL

BUNDLED = {"quadratic": "relu", "quadratic_tanh": "tanh"}


def train_bundled(directory: Path = BUNDLED_DIR) -> dict[str, float]:
    """Retrain every bundled model into `directory`; returns each one's final mse."""
    return {
        name: train_quadratic(directory / f"{name}.keras", activation=activation, name=name)
        for name, activation in BUNDLED.items()
    }


def train_quadratic(
    out: Path = BUNDLED_MODEL,
    *,
    seed: int = 0,
    epochs: int = 1000,
    activation: str = "relu",
    name: str = "quadratic",
) -> float:
    """Fit the bundled network deterministically, save it to `out`, return its final mse."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    x = np.linspace(0.0, 1.0, 100, dtype=np.float32).reshape(-1, 1)
    y = 4.0 * (x - 0.5) ** 2
    model = keras.Sequential(
        [
            keras.Input(shape=(1,), name="x"),
            keras.layers.Dense(32, activation=activation),
            keras.layers.Dense(32, activation=activation),
            keras.layers.Dense(1),
        ],
        name=name,
    )
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, y, batch_size=10, epochs=epochs, verbose=0, shuffle=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return float(history.history["loss"][-1])
