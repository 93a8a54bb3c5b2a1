"""Which backends can serve a Keras model file, read from the file's own configuration before
any backend loads it: a layer that only some backends have refuses the model with a message
naming the layer and those backends, instead of a framework's traceback from deep inside the
load. Framework-free (zipfile, json, h5py), so every backend refuses with the same words."""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

from gradserve.server.engine.errors import ModelError

# Keras 3 layers that wrap one framework's own objects, and the backends that have them.
BACKEND_ONLY_LAYERS: dict[str, tuple[str, ...]] = {
    "TFSMLayer": ("tensorflow",),
    "JaxLayer": ("jax",),
    "FlaxLayer": ("jax",),
    "TorchModuleWrapper": ("torch",),
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def check(path: Path, backend: str) -> None:
    """ModelError if a layer of the Keras file at `path` exists on other backends only. A file
    whose configuration cannot be read passes: the backend's loader says what is wrong."""
    try:
        found = layers(path)
    except ModelError:
        return
    for name, class_name in found:
        backends = BACKEND_ONLY_LAYERS.get(class_name)
        if backends is not None and backend not in backends:
            choices = " or ".join(f"--backend {b}" for b in backends)
            raise ModelError(
                f"{path}: layer {name!r} is a {class_name}, which only the {', '.join(backends)} "
                f"backend has; serve this model with {choices}"
            )


def load_failure(path: Path, backend: str, exc: Exception) -> ModelError:
    """The error for a Keras file that failed to load on `backend`: the framework's words
    (without terminal colours), and what to do about the Lambda layers it has, if any, since a
    Lambda's Python function calls the ops of the framework it was written for."""
    message = f"cannot load {path} on the {backend} backend: {_ANSI.sub('', str(exc)).strip()}"
    try:
        names = [name for name, class_name in layers(path) if class_name == "Lambda"]
    except ModelError:
        names = []
    if names:
        message += (
            f"\nLambda layer(s) {', '.join(repr(name) for name in names)}: a Lambda's Python "
            "function runs only on the backend whose ops it calls; serve the model with that "
            "--backend (tensorflow for tf.* calls), or rewrite the function with keras.ops and "
            "give the layer an output_shape. Loading a Lambda runs the code saved in the file: "
            "it needs --unsafe-deserialization"
        )
    return ModelError(message)


def layers(path: Path) -> list[tuple[str, str]]:
    """(name, class name) of every layer of the Keras file, nested models' layers included."""
    config = _model_config(path)
    return list(_walk(config))


def _model_config(path: Path) -> dict:
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        import h5py

        with h5py.File(path, "r") as file:
            raw = file.attrs.get("model_config")
        if raw is None:
            raise ModelError(f"{path}: an .h5 file without a model configuration (weights only?)")
        return json.loads(raw)
    except ModelError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelError(f"cannot read the model configuration of {path}: {exc}") from exc


def _walk(node: object, is_layer: bool = False) -> Iterator[tuple[str, str]]:
    """Layers are the items of a model's `layers` list and a wrapper's `layer`."""
    if isinstance(node, dict):
        config = node.get("config")
        if is_layer and isinstance(node.get("class_name"), str) and isinstance(config, dict):
            yield str(config.get("name", "?")), node["class_name"]
        for key, value in node.items():
            yield from _walk(value, key in ("layers", "layer"))
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value, is_layer)
