"""The wire contract: committed generated code is current, and the .proto alone is enough."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_up_to_date(tmp_path):
    # protoc runs in its own process: in one with TensorFlow loaded it crashes.
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)],
        check=True,
        timeout=60,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc produced nothing"
    stale = [
        str(rel)
        for rel in generated
        if not (ROOT / "protos" / rel).exists()
        or (ROOT / "protos" / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


PROTO_ONLY_CLIENT = textwrap.dedent(
    """
    import json, sys
    import grpc
    import onlyproto_pb2 as pb, onlyproto_pb2_grpc as rpc
    assert not any(m.startswith("gradserve") for m in sys.modules)
    stub = rpc.GradientServiceStub(grpc.insecure_channel(sys.argv[1]))
    x = pb.Tensor(shape=[2, 1], dtype=pb.FLOAT64, data=bytes.fromhex(sys.argv[2]))
    unary = stub.Evaluate(pb.EvaluateRequest(id="u", x=x), timeout=10)
    messages = [pb.EvaluateRequest(id=str(i), x=x) for i in range(3)]
    streamed = list(stub.EvaluateStream(iter(messages), timeout=10))
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    print(json.dumps({"unary": [unary.id, list(unary.dy_dx.shape), unary.dy_dx.data.hex()],
                      "stream": [r.id for r in streamed], "model": info.name}))
    """
)


def test_a_client_with_only_the_proto_calls_all_three_rpcs(server, tmp_path):
    """Compile the .proto on its own (another file name, no gradserve package) and call."""
    import numpy as np

    shutil.copy(ROOT / "protos/gradserve/v1/gradserve.proto", tmp_path / "onlyproto.proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", str(tmp_path / "onlyproto.proto")],
        check=True, timeout=60,
    )  # fmt: skip
    (tmp_path / "client.py").write_text(PROTO_ONLY_CLIENT)
    x = np.array([0.2, 0.6])
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, str(tmp_path / "client.py"), server.target, x.tobytes().hex()],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["model"] == "quadratic" and out["stream"] == ["0", "1", "2"]
    rid, shape, data = out["unary"]
    grad = np.frombuffer(bytes.fromhex(data), "<f4")
    assert rid == "u" and shape == [2, 1]
    np.testing.assert_allclose(grad, 8 * (x - 0.5), atol=0.3)
