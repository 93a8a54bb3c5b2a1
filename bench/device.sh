#!/usr/bin/env bash
# The accelerator run: bench/device.py's three phases (engine, servers, stand-in) on the GPU
# machine, which has Python 3.12 with CUDA JAX but no Keras, no TensorFlow and no network.
#
# Here, first: `make device-bundle` (wheels and perf_analyzer into build/device). Then one
# call of the device tool, carrying build/device:
#   command: bash bench/device.sh, carry: ["build/device"], timeout_s: 480
# It installs the carried wheels (gradserve's own among them) into /tmp/site, runs within a
# budget of 400 s, and leaves device.json and device.md in $OUT. Back here:
#   .venv/bin/python bench/device.py --render <files_at>/device.json
# `make device-rehearsal` runs the same script here, TensorFlow hidden, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${DEVICE_PYTHON:-python3}
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax
if ! "$PY" -c "import keras, gradserve.server" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site build/device/wheels/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -x build/device/perf_analyzer/bin/perf_analyzer ]; then
    export PERF_ANALYZER=$PWD/build/device/perf_analyzer/bin/perf_analyzer
fi
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
exec "$PY" bench/device.py --out "${OUT:-build/device-run}" "$@"
