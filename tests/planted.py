"""A deterministic engine whose tiles compute one position another way on purpose, for the
self-check's tests; run as a script, `gradserve serve` (taking its flags) with every version
loaded as such an engine.

The flaw: the last row of every tile is scaled by (1 + 2**-20) inside the compiled function,
as a kernel with a remainder path would compute it with other bits. TensorFlow is imported
only where a version loads (the engine process with --frontends), as in gradserve serve.
"""

from __future__ import annotations

import sys

from gradserve.server import cli
from gradserve.server.engine import startup

SCALE = 1 + 2**-20


def position_dependent(engine_class: type) -> type:
    """A subclass of the compiled engine class whose tiles scale their last row."""
    import tensorflow as tf

    class PositionDependent(engine_class):
        def _tiled(self, body, kind):
            tiled = super()._tiled(body, kind)
            tile = self.tile

            def fn(*args):
                results = tiled(*args)
                last = tf.range(tf.shape(results[0])[0]) % tile == tile - 1
                return tuple(_scale_rows(r, last) for r in results)

            return fn

    return PositionDependent


def _scale_rows(tensor, rows):
    import tensorflow as tf

    shape = tf.concat([tf.shape(rows), tf.ones([tf.rank(tensor) - 1], tf.int32)], 0)
    factor = tf.where(rows, tf.constant(SCALE, tensor.dtype), tf.constant(1, tensor.dtype))
    return tensor * tf.reshape(factor, shape)


_load = startup._load


def _planted_load(config, observer, name, version, path):
    from gradserve.server.engine import compiled

    compiled.TensorFlowEngine = position_dependent(
        _CLEAN.setdefault("TensorFlowEngine", compiled.TensorFlowEngine)
    )
    return _load(config, observer, name, version, path)


_CLEAN: dict[str, type] = {}

if __name__ in ("__main__", "__mp_main__"):  # the script, and the processes it spawns
    startup._load = _planted_load

if __name__ == "__main__":
    sys.exit(cli.main(["serve", *sys.argv[1:]]))
