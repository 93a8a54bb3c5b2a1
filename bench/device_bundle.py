"""Gather what the accelerator machine lacks into one folder to carry there (`make
device-bundle`; bench/device.sh installs from it).

That machine runs Python 3.12 with JAX (CUDA), grpcio, protobuf, numpy, aiohttp, h5py and
prometheus-client, and can download nothing. Carried: gradserve's own wheel (this tree, built
now), wheels for the packages below at the versions this venv runs (the ones the tests passed
with; grpcio and protobuf too, since the generated code checks their versions), and
perf_analyzer with its two libraries.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PERF_ANALYZER = ROOT / "build" / "perf_analyzer"
CARRIED = (
    "keras", "namex", "optree", "grpcio", "protobuf", "grpcio-health-checking",
    "grpcio-reflection", "orjson", "opentelemetry-api", "opentelemetry-sdk",
    "opentelemetry-semantic-conventions",
)  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip


def main(out: Path) -> None:
    wheels = out / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    wheels.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    *platforms, "-d", str(wheels), *pins], check=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True)  # fmt: skip
    tool = out / "perf_analyzer"
    (tool / "bin").mkdir(parents=True)
    shutil.copy2(PERF_ANALYZER / "bin" / "perf_analyzer", tool / "bin")
    shutil.copytree(PERF_ANALYZER / "lib", tool / "lib")
    runtime = tool / "nvidia" / "cuda_runtime" / "lib"
    runtime.mkdir(parents=True)
    shutil.copy2(PERF_ANALYZER / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12", runtime)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: gradserve, {len(pins)} wheels and perf_analyzer, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "device")
