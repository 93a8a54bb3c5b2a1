"""On PYTHONPATH, makes `import tensorflow` fail as on the accelerator machine, which has no
TensorFlow: bench/device.sh's rehearsal here (`make device-rehearsal`) runs with it."""

import sys
from importlib.abc import MetaPathFinder


class _NoTensorFlow(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(
                f"No module named {name!r} (the accelerator machine has none)"
            )
        return None


sys.meta_path.insert(0, _NoTensorFlow())
