"""On PYTHONPATH, makes TensorFlow absent as on the accelerator machine, which has none:
bench/device.sh's rehearsal here (`make device-rehearsal`) runs with it. `import tensorflow`
fails, and `importlib.util.find_spec` reports no such module, as it would there (PyTorch's
compiler probes for it that way)."""

import importlib.util
import sys
from importlib.abc import MetaPathFinder


def _hidden(name: str) -> bool:
    return name == "tensorflow" or name.startswith("tensorflow.")


class _NoTensorFlow(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            raise ModuleNotFoundError(
                f"No module named {name!r} (the accelerator machine has none)"
            )
        return None


_find_spec = importlib.util.find_spec


def _find_spec_without_tensorflow(name, package=None):
    return None if _hidden(name) else _find_spec(name, package)


importlib.util.find_spec = _find_spec_without_tensorflow
sys.meta_path.insert(0, _NoTensorFlow())
