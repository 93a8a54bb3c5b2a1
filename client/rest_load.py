"""`gradserve loadtest --protocol rest`: the same unary steps over the standard protocol's
HTTP/JSON endpoints (KServe v2 REST), with aiohttp's client.

Each request is the SDK-built native request turned into a v2 REST body: the tensors in
Triton's binary tensor extension (`--http-data binary`, the default: no JSON numbers either
way) or as JSON data (`--http-data json`), the derivative as the `derivative` parameter. The
answer's latency breakdown comes from its response parameters, so the table and breakdown
read as for gRPC. HTTP errors are counted as `HTTP_<status>`.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import native, tensors
from gradserve.wire.http import HEADER_LENGTH
from gradserve.wire.timing import FIELDS

ENCODINGS = ("binary", "json")
_INPUT, _VECTOR = "x", "v"


def _import_aiohttp():
    try:
        import aiohttp
    except ImportError:
        raise ValueError("--protocol rest needs aiohttp: pip install 'gradserve[http]'") from None
    return aiohttp


def _tensor(name: str, array: np.ndarray, encoding: str) -> tuple[dict, bytes]:
    entry = {"name": name, "datatype": tensors.float_type(array.dtype).kserve,
             "shape": list(array.shape)}  # fmt: skip
    if encoding == "json":
        entry["data"] = array.ravel().tolist()
        return entry, b""
    raw = np.ascontiguousarray(array).tobytes()
    entry["parameters"] = {"binary_data_size": len(raw)}
    return entry, raw


def rest_body(request: pb.EvaluateRequest, encoding: str) -> tuple[bytes, dict[str, str]]:
    """A native request as a v2 REST body and its headers."""
    named = [(_INPUT, tensors.from_tensor(request.x))]
    if request.HasField("v"):
        named.append((_VECTOR, tensors.from_tensor(request.v)))
    pieces = [_tensor(name, array, encoding) for name, array in named]
    kind = native.KIND[request.derivative].value
    document = {"inputs": [entry for entry, _ in pieces],
                "parameters": {"derivative": kind,
                               "binary_data_output": encoding == "binary"}}  # fmt: skip
    header = json.dumps(document).encode()
    if encoding == "json":
        return header, {"Content-Type": "application/json"}
    binary = b"".join(raw for _, raw in pieces)
    return header + binary, {"Content-Type": "application/octet-stream",
                             HEADER_LENGTH: str(len(header))}  # fmt: skip


def _hops(answer: bytes, headers) -> tuple[int, tuple[int, ...]]:
    """(batch_rows, hops in the tally's order) from an answer's JSON (header)."""
    length = headers.get(HEADER_LENGTH)
    document = json.loads(answer if length is None else answer[: int(length)])
    parameters = document.get("parameters", {})
    values = {name: int(parameters.get(name, 0)) for name in FIELDS}
    return values.pop("batch_rows"), tuple(values.values())


async def model_name(session, base: str, model: str, timeout: float) -> str:
    """`model`, or the one model the server's OpenAPI document lists."""
    if model:
        return model
    async with session.get(f"{base}/v2/openapi.json", timeout=timeout) as response:
        document = await response.json()
    served = document["paths"]["/v2/models/{model}"]["parameters"][0]["schema"].get("enum", [])
    if len(served) != 1:
        raise ValueError(f"the server serves {served}: name one with --model")
    return served[0]


async def model_shapes(session, base: str, model: str, timeout: float):
    """(input shape per row, output shape per row, dtype) from the model metadata."""
    async with session.get(f"{base}/v2/models/{model}", timeout=timeout) as response:
        if response.status != 200:
            raise ValueError(f"model {model!r}: HTTP {response.status}: {await response.text()}")
        meta = await response.json()
    x = next(t for t in meta["inputs"] if t["name"] == _INPUT)
    y = meta["outputs"][0]
    return tuple(x["shape"][1:]), tuple(y["shape"][1:]), tensors.by_kserve(x["datatype"]).numpy


class RestCaller:
    """One session to one server: POSTs bodies to the model's infer endpoint."""

    def __init__(self, target: str, connections: int, timeout: float, tls_context=None) -> None:
        aiohttp = _import_aiohttp()
        scheme = "https" if tls_context is not None else "http"
        self.base = f"{scheme}://{target}"
        connector = aiohttp.TCPConnector(limit=connections, ssl=tls_context or False)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        )
        self._errors = (aiohttp.ClientError, asyncio.TimeoutError)

    async def close(self) -> None:
        await self.session.close()

    async def call(self, url: str, body: bytes, headers: dict[str, str], tally) -> None:
        started = time.perf_counter()
        try:
            async with self.session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
                status, answer_headers = response.status, response.headers
        except self._errors as error:
            tally.failed_named(type(error).__name__)
            return
        if status != 200:
            tally.failed_named(f"HTTP_{status}")
            return
        batch_rows, hops = _hops(answer, answer_headers)
        tally.answered(time.perf_counter() - started, batch_rows, hops)
