"""Start-up of a process that owns the models: the repository of the configured models, whose
loader loads and warms up one model version."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradserve.server.config import ServerConfig
from gradserve.server.core.contract import ENGINE_KINDS, Engine, ModelSpec
from gradserve.server.core.repository import LoadObserver, Repository, model_file
from gradserve.server.core.selfcheck import SelfCheckFailed
from gradserve.wire.kinds import Derivative

log = logging.getLogger("gradserve")
LOADING_NICE = 10  # a version loads beside the ones serving: after them for the CPU


def open_repository(config: ServerConfig, observer: LoadObserver | None = None) -> Repository:
    """The repository of every model the configuration names (--model, --model-repository)
    under its --model-control; nothing is loaded until it starts."""
    config.model_sources()  # a bad --model-name fails here, before anything listens
    os.environ["KERAS_BACKEND"] = config.backend  # read once, when Keras is first imported
    if config.backend == "torch" and config.device != "auto":  # where Keras puts variables
        os.environ["KERAS_TORCH_DEVICE"] = config.device.replace("gpu", "cuda")
    if config.unsafe_deserialization:
        log.warning(
            "unsafe deserialization is on: model files may run code", extra={"event": "unsafe"}
        )
    return Repository(
        config.model_sources,
        functools.partial(load_version, config, observer),
        control=config.model_control,
        observer=observer,
    )


def load_version(
    config: ServerConfig, observer: LoadObserver | None, name: str, version: int, path: Path
) -> Engine:
    """Load and warm up one version (TensorFlow is imported here, when a model is loaded, not
    when this module is: a frontend process imports it and never loads a model), on a thread
    of its own at a lower CPU priority, so that the versions serving meanwhile keep theirs
    (the thread ends with the load: a raised nice value cannot be lowered without
    privileges)."""
    _start_runtime(config.backend)
    with ThreadPoolExecutor(1, thread_name_prefix="gradserve-load") as pool:
        return pool.submit(_load_in_background, config, observer, name, version, path).result()


@functools.cache
def _start_runtime(backend: str) -> None:
    """Create the framework's thread pools here, at this thread's priority: threads inherit
    their creator's nice value, so pools first made by a loading thread would compute every
    batch after it at LOADING_NICE."""
    if backend == "jax":
        import jax

        jax.jit(lambda x: x + 1)(jax.numpy.ones((1,))).block_until_ready()
        return
    if backend == "torch":
        import torch

        torch.ones((64, 64)).matmul(torch.ones((64, 64)))
        return
    import tensorflow as tf

    tf.function(lambda x: x + 1, jit_compile=True)(tf.ones((1,)))


def _load_in_background(
    config: ServerConfig, observer: LoadObserver | None, name: str, version: int, path: Path
) -> Engine:
    with contextlib.suppress(OSError):  # Linux: each thread has its own nice value
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADING_NICE)
    return _load(config, observer, name, version, path)


def _load(
    config: ServerConfig, observer: LoadObserver | None, name: str, version: int, path: Path
) -> Engine:
    engine = _engine_class(config.backend)(
        model_file(path),
        device=config.device,
        xla=config.xla,
        deterministic=config.deterministic,
        max_batch_size=config.max_batch_size,
        name=name,
        unsafe=config.unsafe_deserialization,
        input_name=config.input or None,
        output_name=config.output or None,
    )
    log.info(
        "model loaded",
        extra={"event": "model_load", "model": engine.name, "version": version,
               "backend": config.backend,
               "path": str(path), "device": engine.device, "input_shape": engine.input_shape,
               "output_shape": engine.output_shape, "dtype": engine.dtype.name},
    )  # fmt: skip
    kinds = _servable_kinds(engine, config)
    try:
        seconds = engine.warm_up(kinds)  # a deterministic engine self-checks every kind here
    except SelfCheckFailed:
        if observer is not None:
            observer.selfcheck(name, version, False)
        raise
    if engine.deterministic and observer is not None:
        observer.selfcheck(name, version, True)
    log.info(
        "model warmed up",
        extra={"event": "warm_up", "model": engine.name, "version": version,
               "seconds": round(seconds, 2), "xla": engine.xla,
               "deterministic": engine.deterministic, "kinds": [kind.value for kind in kinds]},
    )  # fmt: skip
    return engine


def _engine_class(backend: str) -> type:
    """The backend's engine class (its module imports the framework)."""
    if backend == "jax":
        from gradserve.server.engine import jax_engine

        return jax_engine.JaxEngine
    if backend == "torch":
        from gradserve.server.engine import torch_engine

        return torch_engine.TorchEngine
    from gradserve.server.engine import compiled

    return compiled.TensorFlowEngine


def _servable_kinds(engine: Engine, config: ServerConfig) -> list[Derivative]:
    """The kinds that can be answered for one row at all: a kind whose one-row result is
    over --max-result-mb (a Hessian of a 64x64x3 input is 576 MiB) is always refused, and
    warming it up would grow TensorFlow's memory by that much for nothing."""
    spec = ModelSpec.of(engine, config.max_batch_size, config.max_queue_rows)
    return [k for k in ENGINE_KINDS if spec.result_row_bytes(k) <= config.max_result_bytes]
