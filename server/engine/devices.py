"""Which device a model runs on: `--device` mapped to a TensorFlow device that exists here."""

from __future__ import annotations

import tensorflow as tf

from gradserve.server.engine.loading import ModelError


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
