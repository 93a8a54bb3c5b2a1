"""The engine: the only code of the server that imports TensorFlow (checked by `make lint`):
loading model files, choosing the device, the compiled output and derivative functions, and
the offline training of the bundled models. Importing this package imports nothing heavy.
"""

import os

# TensorFlow's C++ start-up chatter, unless the caller asked for it (read when TF loads).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
