"""The standard protocol over HTTP/JSON (v2 REST) with real clients: httpx and
tritonclient.http against a real server whose gRPC answers the same rows."""

from __future__ import annotations

import concurrent.futures
import json
from dataclasses import replace

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import TEST_CONFIG, RunningServer, assert_same_answer, free_port
from tritonclient.utils import InferenceServerException

from gradserve.server.core.budget import MemoryBudget
from gradserve.server.metrics import Metrics
from gradserve.server.protocols.rest import RestService
from gradserve.server.serving.control import ControlPlane
from gradserve.wire.kinds import Derivative


@pytest.fixture(scope="module")
def rest(bundled_engine, mimo_engine):
    config = replace(TEST_CONFIG, http_port=free_port())
    with RunningServer(config, [bundled_engine, mimo_engine]) as running:
        yield running, f"http://127.0.0.1:{running.server.http_port}"


def infer(url: str, model: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)


def x_input(rows: np.ndarray, name: str = "x") -> dict:
    return {"name": name, "datatype": "FP32", "shape": list(rows.shape),
            "data": rows.tolist()}  # fmt: skip


def test_health_and_metadata(rest):
    _, url = rest
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/mimo/ready").json()["ready"] is True
    server = httpx.get(f"{url}/v2").json()
    assert server["name"] == "gradserve" and "model_configuration" in server["extensions"]
    meta = httpx.get(f"{url}/v2/models/mimo").json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert [o["name"] for o in meta["outputs"]] == ["y", "dy_dx"]
    assert httpx.get(f"{url}/v2/models/mimo/versions/1").json()["name"] == "mimo"
    config = httpx.get(f"{url}/v2/models/mimo/config").json()
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [3]}]
    assert config["max_batch_size"] > 0
    missing = httpx.get(f"{url}/v2/models/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_json_answers_equal_the_grpc_answers_bit_for_bit(rest):
    running, url = rest
    x = np.random.default_rng(4).normal(size=(5, 3)).astype(np.float32)
    with grpcclient.InferenceServerClient(running.target) as grpc_client:
        for derivative in ("gradient", "jacobian", "hessian", "none"):
            body = {"id": "r1", "inputs": [x_input(x)], "parameters": {"derivative": derivative}}
            got = infer(url, "mimo", body)
            assert got.status_code == 200, got.text
            answer = got.json()
            assert answer["id"] == "r1" and answer["model_name"] == "mimo"
            assert answer["parameters"]["total_us"] > 0  # the latency breakdown, as on gRPC
            tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            expected = grpc_client.infer("mimo", [tensor], parameters={"derivative": derivative})
            for output in answer["outputs"]:
                data = np.asarray(output["data"], np.float32).reshape(output["shape"])
                assert_same_answer(data, expected.as_numpy(output["name"]))


def test_tritonclient_http_with_vectors_explanations_outputs_and_priority(rest):
    running, url = rest
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 3)).astype(np.float32)
    v = rng.normal(size=(3, 2)).astype(np.float32)
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_ready() and client.is_model_ready("mimo")
    inputs = []
    for name, array in (("x", x), ("v", v)):
        tensor = httpclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array, binary_data=False)
        inputs.append(tensor)
    outputs = [httpclient.InferRequestedOutput("dy_dx", binary_data=False)]
    vjp = client.infer("mimo", inputs, outputs=outputs, priority=1,
                       parameters={"derivative": "vjp"})  # fmt: skip
    with grpcclient.InferenceServerClient(running.target) as grpc_client:
        tensors = []
        for name, array in (("x", x), ("v", v)):
            tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        expected = grpc_client.infer("mimo", tensors, parameters={"derivative": "vjp"})
    assert_same_answer(vjp.as_numpy("dy_dx"), expected.as_numpy("dy_dx"))
    assert vjp.as_numpy("y") is None  # only what was asked for
    ig = client.infer("mimo", inputs[:1],
                      parameters={"derivative": "integrated_gradients", "steps": 8})  # fmt: skip
    assert ig.as_numpy("attributions").shape == (3, 3) and ig.as_numpy("delta").shape == (3,)
    with pytest.raises(InferenceServerException) as info:
        client.infer("mimo", inputs[:1], parameters={"derivative": "vjp"})
    assert "expected input tensor(s)" in str(info.value)
    client.close()


def one(shape: list[int], data: object, datatype: str = "FP32", **extra: object) -> bytes:
    """A request body with one input x."""
    tensor = {"name": "x", "datatype": datatype, "shape": shape, "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


@pytest.mark.parametrize(
    ("body", "status", "said"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, '"inputs"'),
        (b'{"inputs": []}', 400, '"inputs"'),
        (one([2, 3], [1, 2]), 400, "needs 6"),
        (one([1, 3], [1, 2, 3], "INT8"), 400, "FP32 or FP64"),
        (one([1, 3], ["a", 2, 3]), 400, "numbers only"),
        (one([1, 4], [1, 2, 3, 4]), 400, "shape"),
        (one([1, 3], [1, 2, 3], parameters={"derivative": "curl"}), 400, "expected one of"),
    ],
)
def test_bad_requests_get_a_precise_400_and_the_server_still_answers(rest, body, status, said):
    _, url = rest
    got = httpx.post(f"{url}/v2/models/mimo/infer", content=body, timeout=30)
    assert got.status_code == status, got.text
    assert said in got.json()["error"]
    fine = infer(url, "mimo", {"inputs": [x_input(np.zeros((1, 3), np.float32))]})
    assert fine.status_code == 200


def test_concurrent_rest_callers_share_batches_with_the_same_answers(rest, mimo_engine):
    _, url = rest
    rng = np.random.default_rng(6)
    rows = [rng.normal(size=(1 + i % 3, 3)).astype(np.float32) for i in range(48)]

    def call(x: np.ndarray) -> np.ndarray:
        answer = infer(url, "mimo", {"inputs": [x_input(x)]}).json()
        grad = next(o for o in answer["outputs"] if o["name"] == "dy_dx")
        return np.asarray(grad["data"], np.float32).reshape(grad["shape"])

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, rows))
    for x, got in zip(rows, answers, strict=True):
        assert_same_answer(got, mimo_engine.run(Derivative.GRADIENT, x).dy_dx)


def test_rest_requests_are_counted_in_the_metrics(rest):
    running, url = rest
    infer(url, "mimo", {"inputs": [x_input(np.zeros((1, 3), np.float32))]})
    infer(url, "nope", {"inputs": []})
    samples = {
        (s.labels.get("rpc"), s.labels.get("code")): s.value
        for metric in running.server.metrics.registry.collect()
        if metric.name == "gradserve_requests"
        for s in metric.samples
        if s.name == "gradserve_requests_total"
    }
    assert samples[("rest/infer", "OK")] >= 1
    assert samples[("rest/infer", "NOT_FOUND")] >= 1


def test_binary_tensors_with_tritonclient_http_equal_the_json_answers(rest):
    _, url = rest
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary_data=True: Triton's binary tensor extension
    outputs = [httpclient.InferRequestedOutput(n) for n in ("y", "dy_dx")]
    got = client.infer("mimo", [tensor], outputs=outputs, parameters={"derivative": "jacobian"})
    client.close()
    body = {"inputs": [x_input(x)], "parameters": {"derivative": "jacobian"}}
    as_json = {o["name"]: o for o in infer(url, "mimo", body).json()["outputs"]}
    for name in ("y", "dy_dx"):
        expected = np.asarray(as_json[name]["data"], np.float32).reshape(as_json[name]["shape"])
        assert_same_answer(got.as_numpy(name), expected)


def binary_body(x: np.ndarray, declared: int | None = None, extra: bytes = b"") -> tuple:
    """A binary-extension request: JSON header, then x's bytes; (body, header length)."""
    size = x.nbytes if declared is None else declared
    header = json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                    "parameters": {"binary_data_size": size}}],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    return header + x.tobytes() + extra, len(header)


def test_a_raw_binary_request_and_answer_with_plain_http(rest):
    _, url = rest
    x = np.random.default_rng(8).normal(size=(4, 3)).astype(np.float32)
    body, length = binary_body(x)
    got = httpx.post(f"{url}/v2/models/mimo/infer", content=body, timeout=30,
                     headers={"Inference-Header-Content-Length": str(length)})  # fmt: skip
    assert got.status_code == 200, got.text
    header_length = int(got.headers["Inference-Header-Content-Length"])
    header = json.loads(got.content[:header_length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert [o["name"] for o in header["outputs"]] == ["y", "dy_dx"]
    assert header_length + sum(sizes) == len(got.content)
    dy_dx = np.frombuffer(got.content[header_length + sizes[0] :], np.float32).reshape(4, 3)
    body = {"inputs": [x_input(x)]}
    expected = next(o for o in infer(url, "mimo", body).json()["outputs"] if o["name"] == "dy_dx")
    assert_same_answer(dy_dx, np.asarray(expected["data"], np.float32).reshape(4, 3))


@pytest.mark.parametrize(
    ("declared", "extra", "length", "said"),
    [
        (48, b"", "100000", "Inference-Header-Content-Length"),
        (48, b"", "abc", "Inference-Header-Content-Length"),
        (40, b"", None, "need 48 bytes"),
        (48, b"\0" * 8, None, "8 bytes after the last binary input"),
        (1 << 40, b"", None, "need 48 bytes"),
    ],
)
def test_binary_requests_that_do_not_add_up_get_a_precise_400(rest, declared, extra, length, said):
    _, url = rest
    body, header_length = binary_body(np.zeros((4, 3), np.float32), declared, extra)
    headers = {"Inference-Header-Content-Length": length or str(header_length)}
    got = httpx.post(f"{url}/v2/models/mimo/infer", content=body, headers=headers, timeout=30)
    assert got.status_code == 400, got.text
    assert said in got.json()["error"]


def test_a_body_shorter_than_its_binary_header_says_is_refused(rest):
    _, url = rest
    body, length = binary_body(np.zeros((4, 3), np.float32))
    got = httpx.post(f"{url}/v2/models/mimo/infer", content=body[:-8], timeout=30,
                     headers={"Inference-Header-Content-Length": str(length)})  # fmt: skip
    assert got.status_code == 400 and "the body has 40 left" in got.json()["error"]


def test_a_zero_length_header_means_the_body_is_the_rows_of_x(rest):
    _, url = rest
    x = np.random.default_rng(9).normal(size=(5, 3)).astype(np.float32)
    raw = httpx.post(f"{url}/v2/models/mimo/infer", content=x.tobytes(), timeout=30,
                     headers={"Inference-Header-Content-Length": "0"})  # fmt: skip
    assert raw.status_code == 200, raw.text
    got = {o["name"]: o for o in raw.json()["outputs"]}
    assert got["dy_dx"]["shape"] == [5, 3]
    expected = {
        o["name"]: o for o in infer(url, "mimo", {"inputs": [x_input(x)]}).json()["outputs"]
    }
    assert got == expected
    partial = httpx.post(f"{url}/v2/models/mimo/infer", content=x.tobytes()[:-4], timeout=30,
                         headers={"Inference-Header-Content-Length": "0"})  # fmt: skip
    assert partial.status_code == 400 and "12 bytes each" in partial.json()["error"]


# --- The OpenAPI document, and schemathesis against the live server ---

SCHEMATHESIS_EXAMPLES = 30  # per operation and generation mode: about 10 s in all


def test_the_openapi_document_describes_every_route_and_served_model(rest):
    _, url = rest
    document = httpx.get(f"{url}/v2/openapi.json").json()
    service = RestService(Metrics(), ControlPlane(lambda: True), MemoryBudget(1))
    assert set(document["paths"]) == service.paths
    model = document["paths"]["/v2/models/{model}/infer"]["parameters"][0]
    assert model["schema"]["enum"] == ["mimo", "quadratic"]
    parameters = document["components"]["schemas"]["Parameters"]["properties"]
    assert parameters["derivative"]["enum"] == [kind.value for kind in Derivative]
    assert {"target", "priority", "steps", "samples", "noise", "seed"} <= parameters.keys()


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(rest):
    """Every operation, schema-valid and schema-violating requests: no 5xx, every status,
    content type, header and body as documented, every invalid request refused with a 4xx.
    Schema-valid requests may still be refused (400): no schema can say that a tensor's
    shape must be the model's, so that one check is left out."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    _, url = rest
    schema = schemathesis.openapi.from_url(f"{url}/v2/openapi.json")
    failures, cases = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        takes_input = bool(operation.path_parameters or operation.body)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 1 + takes_input]:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, database=None,
                      derandomize=True, suppress_health_check=list(HealthCheck))  # fmt: skip
            def check(case) -> None:
                nonlocal cases
                cases += 1
                case.call_and_validate(base_url=url, excluded_checks=[positive_data_acceptance])

            try:
                check()
            except Exception as exc:
                failures.append(f"{operation.label} ({mode.value}): {str(exc)[:2000]}")
    assert not failures, "\n\n".join(failures)
    assert cases >= 10 * SCHEMATHESIS_EXAMPLES
