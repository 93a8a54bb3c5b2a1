"""Train the bundled models.

`quadratic` and `quadratic_tanh`: the network of the original K.gradients question,
Dense(32, act) -> Dense(32, act) -> Dense(1) on one input, fitted to
y = 4(x - 0.5)^2 on x = linspace(0, 1, 100), so dy/dx = 8(x - 0.5) and d2y/dx2 = 8.
`quadratic` uses relu (piecewise linear: its second derivative is 0 almost everywhere);
`quadratic_tanh` uses tanh, so second derivatives are meaningful.

`digits`: a small CNN classifying scikit-learn's 8x8 handwritten digits (bundled with
scikit-learn, so no download), a model worth explaining; it also writes a few held-out digits
for `make explain-demo`. scikit-learn is needed only here (the dev extra installs it).

Offline tooling, never imported by the serving path (see docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from gradserve.server.config import BUNDLED_DIR, BUNDLED_MODEL

BUNDLED = {"quadratic": "relu", "quadratic_tanh": "tanh"}
DIGITS_SAMPLES = Path(__file__).resolve().parents[2] / "demo" / "digits_samples.npz"


def train_bundled(directory: Path = BUNDLED_DIR) -> dict[str, str]:
    """Retrain every bundled model into `directory`; returns how each one fits."""
    fits = {}
    for name, activation in BUNDLED.items():
        mse = train_quadratic(directory / f"{name}.keras", activation=activation, name=name)
        fits[name] = f"final mse {mse:.2e}"
    accuracy = train_digits(directory / "digits.keras")
    fits["digits"] = f"held-out accuracy {accuracy:.3f}"
    return fits


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


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits as images [n, 8, 8, 1] in [0, 1] and labels [n]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return images, digits.target.astype(np.int64)


def train_digits(
    out: Path = BUNDLED_DIR / "digits.keras",
    *,
    samples_out: Path = DIGITS_SAMPLES,
    seed: int = 0,
    epochs: int = 40,
) -> float:
    """Fit the digits CNN on a fixed 80% split, save it (logits out: 10 per row) and one
    held-out example of each class to `samples_out`; return the held-out accuracy."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    images, labels = digits_data()
    order = np.random.default_rng(seed).permutation(len(images))
    split = int(0.8 * len(images))
    train, test = order[:split], order[split:]
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1), name="x"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="digits",
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(images[train], labels[train], batch_size=32, epochs=epochs, verbose=0)
    _, accuracy = model.evaluate(images[test], labels[test], verbose=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    picks = [test[labels[test] == digit][0] for digit in range(10)]
    samples_out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(samples_out, x=images[picks], label=labels[picks])
    return float(accuracy)
