"""Generate the Python modules for the .proto files under protos/.

Generated code is committed next to its .proto so that a plain `pip install .`
needs no protoc. `make proto` rewrites it; tests/test_protos.py fails when the
committed files differ from what this script produces. Run it as a script: protoc
crashes inside a process that has TensorFlow loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ["gradserve/v1/gradserve.proto", "gradserve/inference/grpc_service.proto"]
# Protos whose messages are registered in a private descriptor pool instead of the default
# one: the standard protocol's `inference.*` names are also registered by other packages
# (tritonclient), and one process can then load both.
PRIVATE_POOL = {"gradserve/inference/grpc_service.proto"}
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile("


def generate(out_dir: Path) -> None:
    """Compile every proto in PROTO_FILES into out_dir (mirrors the proto paths)."""
    include = Path(protoc.__file__).resolve().parent / "_proto"
    for proto in PROTO_FILES:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        if proto in PRIVATE_POOL:
            _use_private_pool(out_dir / proto.replace(".proto", "_pb2.py"))


def _use_private_pool(module: Path) -> None:
    text = module.read_text()
    if text.count(_DEFAULT_POOL) != 1:
        raise RuntimeError(f"{module}: unexpected generated code, cannot move it to a private pool")
    module.write_text(text.replace(_DEFAULT_POOL, _PRIVATE_POOL))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
