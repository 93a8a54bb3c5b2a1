"""Start-up of a process that owns the models: load and warm up every model configured."""

from __future__ import annotations

import logging

from gradserve.server.config import ServerConfig
from gradserve.server.core.contract import ENGINE_KINDS, Engine, ModelSpec
from gradserve.wire.kinds import Derivative

log = logging.getLogger("gradserve")


def load_engines(config: ServerConfig) -> list[Engine]:
    """Load and warm up every model the configuration names (TensorFlow is imported here,
    when a model is loaded, not when this module is: a frontend process imports it and
    never loads a model)."""
    from gradserve.server.engine import compiled

    paths = config.model_paths()
    if config.model_name and len(paths) != 1:
        raise ValueError("--model-name names one model; several are being served")
    engines = []
    for path in paths:
        engine = compiled.Engine(
            path,
            device=config.device,
            xla=config.xla,
            deterministic=config.deterministic,
            max_batch_size=config.max_batch_size,
            name=config.model_name or None,
            unsafe=config.unsafe_deserialization,
            input_name=config.input or None,
            output_name=config.output or None,
        )
        log.info(
            "model loaded",
            extra={"event": "model_load", "model": engine.name, "path": str(path),
                   "device": engine.device, "input_shape": engine.input_shape,
                   "output_shape": engine.output_shape, "dtype": engine.dtype.name},
        )  # fmt: skip
        kinds = _servable_kinds(engine, config)
        seconds = engine.warm_up(kinds)
        log.info(
            "model warmed up",
            extra={"event": "warm_up", "model": engine.name, "seconds": round(seconds, 2),
                   "xla": engine.xla, "deterministic": engine.deterministic,
                   "kinds": [kind.value for kind in kinds]},
        )  # fmt: skip
        engines.append(engine)
    if config.unsafe_deserialization:
        log.warning(
            "unsafe deserialization is on: model files may run code", extra={"event": "unsafe"}
        )
    return engines


def _servable_kinds(engine: Engine, config: ServerConfig) -> list[Derivative]:
    """The kinds that can be answered for one row at all: a kind whose one-row result is
    over --max-result-mb (a Hessian of a 64x64x3 input is 576 MiB) is always refused, and
    warming it up would grow TensorFlow's memory by that much for nothing."""
    spec = ModelSpec.of(engine, config.max_batch_size, config.max_queue_rows)
    return [k for k in ENGINE_KINDS if spec.result_row_bytes(k) <= config.max_result_bytes]
