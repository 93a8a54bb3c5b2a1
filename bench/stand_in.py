"""A `--frontends N` server whose engine process computes nothing (`make bench`, tests).

Same supervisor, frontends, exchange, scheduler and batchers as `gradserve serve`; only the
engine process's model is a stand-in: the bundled quadratic's shapes, answering y = x and a
zero derivative without TensorFlow or any device work, so that the exchange's own CPU per
sub-batch can be measured. Takes `gradserve serve`'s flags (the model ones are ignored).
For the scheduler's tests, three variables make each call observable:
GRADSERVE_STAND_IN_SECONDS (each call takes this long), GRADSERVE_STAND_IN_ROW_SECONDS (and
this long more per row) and GRADSERVE_STAND_IN_LOG (each call appends its rows' x values to
this file, one line per call, in the order computed).
Bench and tests only, never a server.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from gradserve.server import config as cfg
from gradserve.server import frontend
from gradserve.server.config import ServerConfig
from gradserve.server.core.contract import Outputs
from gradserve.server.core.repository import LoadObserver, Repository
from gradserve.server.multiproc import supervisor
from gradserve.wire.kinds import Derivative


class StandIn:
    """The bundled quadratic's shapes; y = x and a zero derivative for every kind."""

    name = "quadratic"
    input_shape = (1,)
    output_shape = (1,)
    device = "none (stand-in)"
    numpy_dtype = np.dtype(np.float32)
    ladder = ()
    in_flight = 0
    takes_hints = False

    def __init__(self) -> None:
        self._seconds = float(os.environ.get("GRADSERVE_STAND_IN_SECONDS", "0"))
        self._row_seconds = float(os.environ.get("GRADSERVE_STAND_IN_ROW_SECONDS", "0"))
        self._log = os.environ.get("GRADSERVE_STAND_IN_LOG", "")

    def batch_cap(self, kind: Derivative) -> int | None:
        """None: it computes a batch of any size it is given, in one call."""
        return None

    def run(self, kind: Derivative, x: np.ndarray, v: np.ndarray | None = None) -> Outputs:
        if self._seconds or self._row_seconds:
            time.sleep(self._seconds + self._row_seconds * len(x))
        if self._log:
            with open(self._log, "a") as log:
                log.write(" ".join(f"{value:g}" for value in x.ravel()) + "\n")
        y = np.array(x, np.float32).reshape(len(x), 1)
        return Outputs(y, None if kind is Derivative.NONE else np.zeros_like(y))


def load(config: ServerConfig, observer: LoadObserver) -> Repository:
    return Repository.fixed([StandIn()], observer)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cfg.add_arguments(parser)
    config = cfg.from_namespace(parser.parse_args(argv))
    return supervisor.serve(config, config.frontend_count(), load=load, frontend=frontend.run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
