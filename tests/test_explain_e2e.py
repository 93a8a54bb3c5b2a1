"""Explanations, targets and k tangents through the native protocol and the SDK (blocking
and asyncio, unary and streams), against the same computation in process, on a real server."""

from __future__ import annotations

import concurrent.futures
from dataclasses import replace

import grpc
import numpy as np
import pytest
from conftest import TEST_CONFIG, RunningServer, assert_same_answer, unbatched, wait_until

from gradserve.client import AsyncGradientClient, GradientClient, GradserveError, RetryPolicy
from gradserve.client.results import make_request
from gradserve.server.config import BUNDLED_DIR
from gradserve.server.engine.compiled import TensorFlowEngine
from gradserve.wire.kinds import Derivative

IG, SG = Derivative.INTEGRATED_GRADIENTS, Derivative.SMOOTH_GRAD
MODELS = {"mimo": None, "digits": BUNDLED_DIR / "digits.keras"}


@pytest.fixture(scope="module")
def engines(mimo_model_path):
    paths = {**MODELS, "mimo": mimo_model_path}
    return {
        name: TensorFlowEngine(path, xla=False, max_batch_size=64, name=name, deterministic=True)
        for name, path in paths.items()
    }


@pytest.fixture(scope="module")
def running(engines):
    config = replace(TEST_CONFIG, max_batch_size=64)
    with RunningServer(config, list(engines.values())) as server:
        yield server


@pytest.fixture
def client(running):
    with GradientClient(running.target, timeout=30) as c:
        yield c


def test_requests_carry_the_new_fields():
    request = make_request(np.ones((2, 3)), "integrated_gradients", target=1, steps=8,
                           baseline=[0.5, 0.5, 0.5])  # fmt: skip
    assert request.target == 1 and request.explain.steps == 8
    assert list(request.explain.baseline.shape) == [1, 3]
    request = make_request(np.ones((2, 3)), "smooth_grad", samples=4, noise=0.0, seed=3)
    assert request.explain.HasField("noise") and request.explain.noise == 0.0
    assert not request.HasField("target")
    with pytest.raises(ValueError, match="target is for"):
        make_request(np.ones((2, 3)), "jacobian", target=0)
    with pytest.raises(ValueError, match="takes no option steps"):
        make_request(np.ones((2, 3)), "smooth_grad", steps=4)


def test_integrated_gradients_over_the_wire(client, engines):
    mimo = engines["mimo"]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    per_row = rng.normal(size=(4, 3)).astype(np.float32)
    for baseline, target in ((None, None), (per_row, 1), ([0.1, -0.2, 0.3], 0)):
        got = client.integrated_gradients(x, baseline=baseline, steps=16, target=target,
                                          model="mimo")  # fmt: skip
        b = None if baseline is None else np.asarray(baseline, np.float32).reshape(-1, 3)
        want = unbatched(mimo, IG, x, steps=16, baseline=b, target=target)
        assert got.attributions.shape == (4, 3) and got.delta.shape == (4,)
        assert got.dy_dx is None
        assert_same_answer(got.attributions, want.attributions)
        assert_same_answer(got.delta, want.delta)
        assert_same_answer(got.y, mimo.run(Derivative.NONE, x).y)


def test_smooth_grad_over_the_wire(client, engines):
    mimo = engines["mimo"]
    x = np.random.default_rng(2).normal(size=(3, 3)).astype(np.float32)
    plain = client.evaluate(x, model="mimo").dy_dx
    assert_same_answer(
        client.smooth_grad(x, noise=0.0, samples=5, model="mimo").attributions, plain
    )
    a = client.smooth_grad(x, samples=8, noise=0.3, seed=4, target=1, model="mimo")
    b = client.smooth_grad(x, samples=8, noise=0.3, seed=4, target=1, model="mimo")
    assert_same_answer(a.attributions, b.attributions)
    assert_same_answer(
        a.attributions, unbatched(mimo, SG, x, samples=8, noise=0.3, seed=4, target=1).attributions
    )
    c = client.smooth_grad(x, samples=8, noise=0.05, seed=4, model="mimo", noise_absolute=True)
    want = unbatched(mimo, SG, x, samples=8, noise=0.05, seed=4, noise_absolute=True)
    assert_same_answer(c.attributions, want.attributions)
    assert a.delta is None and a.y.shape == (3, 2)


def test_target_and_k_tangents_over_the_wire(client, engines):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 3)).astype(np.float32)
    onehot = np.zeros((3, 2), np.float32)
    onehot[:, 1] = 1
    assert_same_answer(
        client.evaluate(x, target=1, model="mimo").dy_dx,
        client.evaluate(x, "vjp", v=onehot, model="mimo").dy_dx,
    )
    for kind, width in (("vjp", 2), ("jvp", 3), ("hvp", 3)):
        v = rng.normal(size=(3, 5, width)).astype(np.float32)
        many = client.evaluate(x, kind, v=v, model="mimo")
        assert many.dy_dx.shape[:2] == (3, 5) and many.y.shape == (3, 2)
        for j in range(5):
            one = client.evaluate(x, kind, v=np.ascontiguousarray(v[:, j]), model="mimo")
            assert_same_answer(many.dy_dx[:, j], one.dy_dx)


async def test_streams_and_the_asyncio_client(running, engines):
    mimo = engines["mimo"]
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(6)]
    with GradientClient(running.target, timeout=30) as client:
        streamed = list(client.stream(xs, "integrated_gradients", model="mimo", steps=8,
                                      target=0))  # fmt: skip
    for x, got in zip(xs, streamed, strict=True):
        assert_same_answer(got.attributions, unbatched(mimo, IG, x, steps=8, target=0).attributions)

    async with AsyncGradientClient(running.target, timeout=30) as client:
        ig = await client.integrated_gradients(xs[0], steps=8, model="mimo")
        sg = await client.smooth_grad(xs[1], samples=4, seed=1, model="mimo")
        target = await client.evaluate(xs[2], target=1, model="mimo")
        pairs = [(x, rng.normal(size=(2, 3, 3)).astype(np.float32)) for x in xs[:3]]
        jvps = [r async for r in client.stream(pairs, "jvp", model="mimo")]
        sgs = [r async for r in client.stream(xs[:3], "smooth_grad", model="mimo",
                                              samples=4, seed=2)]  # fmt: skip
    assert_same_answer(ig.attributions, unbatched(mimo, IG, xs[0], steps=8).attributions)
    assert_same_answer(sg.attributions, unbatched(mimo, SG, xs[1], samples=4, seed=1).attributions)
    assert_same_answer(target.dy_dx, mimo.run(Derivative.JACOBIAN, xs[2]).dy_dx[:, 1])
    for (x, v), got in zip(pairs, jvps, strict=True):
        assert_same_answer(got.dy_dx, unbatched(mimo, Derivative.JVP, x, v).dy_dx)
    for x, got in zip(xs[:3], sgs, strict=True):
        assert_same_answer(got.attributions, unbatched(mimo, SG, x, samples=4, seed=2).attributions)


def test_digits_are_explained_as_their_predicted_class(client, engines):
    samples = np.load(BUNDLED_DIR.parent.parent / "demo" / "digits_samples.npz")
    x, labels = samples["x"], samples["label"]
    predicted = client.evaluate(x, "none", model="digits").y.argmax(axis=1)
    assert (predicted == labels).mean() >= 0.9
    for digit in (0, 7):
        ig = client.integrated_gradients(x[digit : digit + 1], steps=32, target=digit,
                                         model="digits")  # fmt: skip
        assert ig.attributions.shape == (1, 8, 8, 1)
        gap = ig.y[0, digit] - unbatched(engines["digits"], Derivative.NONE, 0 * x[:1]).y[0, digit]
        assert abs(ig.delta[0]) <= 0.05 * abs(gap)


def test_mixed_load_from_many_callers_is_exact(client, engines):
    mimo = engines["mimo"]
    rng = np.random.default_rng(6)
    jobs = [(i % 3, rng.normal(size=(int(rng.integers(1, 5)), 3)).astype(np.float32))
            for i in range(30)]  # fmt: skip

    def call(job):
        which, x = job
        if which == 0:
            return client.integrated_gradients(x, steps=24, target=1, model="mimo")
        if which == 1:
            return client.smooth_grad(x, samples=12, seed=len(x), model="mimo")
        return client.evaluate(x, model="mimo")

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, jobs))
    assert max(r.timing.batch_rows for r in results) > 24
    for (which, x), got in zip(jobs, results, strict=True):
        if which == 0:
            want = unbatched(mimo, IG, x, steps=24, target=1)
            assert_same_answer(got.attributions, want.attributions)
            assert_same_answer(got.delta, want.delta)
        elif which == 1:
            assert_same_answer(
                got.attributions, unbatched(mimo, SG, x, samples=12, seed=len(x)).attributions
            )
        else:
            assert_same_answer(got.dy_dx, mimo.run(Derivative.GRADIENT, x).dy_dx)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.evaluate(np.ones((1, 3)), target=2, model="mimo"), "target 2 is out of"),
        (lambda c: c.integrated_gradients(np.ones((1, 3)), steps=-1, model="mimo"), "steps >= 1"),
        (
            lambda c: c.integrated_gradients(
                np.ones((2, 3)), baseline=np.ones((3, 3)), model="mimo"
            ),
            r"baseline has shape \[3, 3\]",
        ),
        (
            lambda c: c.evaluate(np.ones((2, 3)), "jvp", v=np.ones((2, 4, 2)), model="mimo"),
            r"v has shape \[2, 4, 2\]; jvp takes \[n, 3\] .* or \[n, k, 3\]",
        ),
    ],
)
def test_invalid_options_are_invalid_argument(client, call, message):
    with pytest.raises(GradserveError, match=message) as info:
        call(client)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_expansion_limits(bundled_engine, gated_server):
    running, gated = gated_server  # max_queue_rows 64
    gated.gate.clear()
    once = RetryPolicy(attempts=1)
    with (
        GradientClient(running.target, timeout=30) as filler,
        GradientClient(running.target, timeout=30, retry=once) as client,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        with pytest.raises(GradserveError, match=r"not even one row fits.*fewer steps") as info:
            client.integrated_gradients(0.5, steps=64)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(GradserveError, match=r"send at most 4 row\(s\).*fewer steps") as info:
            client.integrated_gradients([0.1, 0.2, 0.3, 0.4, 0.5], steps=15)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        first = pool.submit(filler.evaluate, 0.1)
        wait_until(lambda: gated.entered == 1)
        blocker = pool.submit(filler.evaluate, np.full(60, 0.2))
        wait_until(lambda: running.batcher.queued_rows == 60)
        with pytest.raises(GradserveError, match=r"adds 9.*x 9 path points") as info:
            client.integrated_gradients(0.5, steps=8)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        gated.gate.set()
        assert first.result(timeout=30) and blocker.result(timeout=30)
        ig = client.integrated_gradients(0.5, steps=8)
        assert ig.attributions.shape == (1, 1)


def test_the_standard_protocol_with_tritonclient(running, client):
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 3)).astype(np.float32)
    baseline = rng.normal(size=(1, 3)).astype(np.float32)

    def tensor(name, array):
        t = triton.InferInput(name, list(array.shape), "FP32")
        t.set_data_from_numpy(array)
        return t

    with triton.InferenceServerClient(running.target) as triton_client:
        ig = triton_client.infer(
            "mimo", [tensor("x", x), tensor("baseline", baseline)],
            parameters={"derivative": "integrated_gradients", "steps": 16, "target": 1},
        )  # fmt: skip
        want = client.integrated_gradients(x, baseline, steps=16, target=1, model="mimo")
        assert [o.name for o in ig.get_response().outputs] == ["y", "attributions", "delta"]
        assert_same_answer(ig.as_numpy("attributions"), want.attributions)
        assert_same_answer(ig.as_numpy("delta"), want.delta)
        sg = triton_client.infer(
            "mimo", [tensor("x", x)],
            parameters={"derivative": "smooth_grad", "samples": 6, "noise": 0.2, "seed": 3},
            outputs=[triton.InferRequestedOutput("attributions")],
        )  # fmt: skip
        want = client.smooth_grad(x, samples=6, noise=0.2, seed=3, model="mimo")
        assert_same_answer(sg.as_numpy("attributions"), want.attributions)
        assert sg.as_numpy("y") is None
        target = triton_client.infer("mimo", [tensor("x", x)], parameters={"target": 0})
        assert_same_answer(
            target.as_numpy("dy_dx"), client.evaluate(x, target=0, model="mimo").dy_dx
        )
        v = rng.normal(size=(3, 4, 3)).astype(np.float32)
        jvp = triton_client.infer("mimo", [tensor("x", x), tensor("v", v)],
                                  parameters={"derivative": "jvp"})  # fmt: skip
        assert jvp.as_numpy("dy_dx").shape == (3, 4, 2)
        assert_same_answer(
            jvp.as_numpy("dy_dx"), client.evaluate(x, "jvp", v=v, model="mimo").dy_dx
        )
        with pytest.raises(InferenceServerException) as info:
            triton_client.infer("mimo", [tensor("x", x)],
                                parameters={"derivative": "smooth_grad", "steps": 4})  # fmt: skip
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "['steps'] do not apply" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            triton_client.infer(
                "mimo", [tensor("x", x)],
                parameters={"derivative": "integrated_gradients", "steps": 1 << 20},
            )  # fmt: skip
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "fewer steps" in info.value.message()


def test_native_options_that_do_not_apply_are_refused(running):
    from gradserve.v1 import gradserve_pb2 as pb
    from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
    from gradserve.wire import tensors

    x = tensors.to_tensor(np.ones((2, 3), np.float32))
    baseline = pb.Explain(baseline=tensors.to_tensor(np.zeros((1, 3), np.float32)))
    cases = [
        (pb.EvaluateRequest(x=x, model="mimo", explain=pb.Explain(steps=4)), "explain options"),
        (
            pb.EvaluateRequest(x=x, model="mimo", derivative=pb.SMOOTH_GRAD, explain=baseline),
            "baseline is for integrated_gradients",
        ),
        (
            pb.EvaluateRequest(x=x, model="mimo", derivative=pb.JACOBIAN, target=0),
            "target is for gradient",
        ),
        (  # the same table as the standard protocol's parameters
            pb.EvaluateRequest(
                x=x, model="mimo", derivative=pb.INTEGRATED_GRADIENTS, explain=pb.Explain(seed=3)
            ),
            "['seed'] do not apply to derivative 'integrated_gradients' (seed is for smooth_grad)",
        ),
    ]
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        for request, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.Evaluate(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in info.value.details()
        ok = stub.Evaluate(
            pb.EvaluateRequest(
                x=x, model="mimo", derivative=pb.INTEGRATED_GRADIENTS, explain=baseline
            ),
            timeout=10,
        )
        assert list(ok.attributions.shape) == [2, 3] and list(ok.delta.shape) == [2]
        assert not ok.HasField("dy_dx")


def test_explanations_through_two_frontend_processes(server, frontends_server):
    """The multi-process server (2 frontends, 1 engine process) expands and reduces in its
    frontends and answers as the one-process server does."""
    x = np.linspace(0.05, 0.95, 7)
    calls = [
        lambda c: c.integrated_gradients(x, steps=32),
        lambda c: c.smooth_grad(x, samples=8, seed=1, target=0),
        lambda c: c.evaluate(x, "jvp", v=np.linspace(-1, 1, 21).reshape(7, 3, 1)),
        lambda c: c.evaluate(x, target=0),
    ]
    with (
        GradientClient(server.target, timeout=30) as one,
        GradientClient(frontends_server.target, timeout=30) as two,
    ):
        for call in calls:
            a, b = call(one), call(two)
            for field in ("y", "dy_dx", "attributions", "delta"):
                if getattr(a, field) is None:
                    assert getattr(b, field) is None
                else:
                    assert_same_answer(getattr(b, field), getattr(a, field))


def test_a_high_priority_explanation_from_a_named_caller(running, engines):
    """Issue 14's priority (field 8) and caller key beside issue 12's target (6) and explain
    (7): all three cross the wire, and the explanation is answered exactly."""
    from gradserve.v1 import gradserve_pb2 as pb
    from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
    from gradserve.wire import tensors

    fields = pb.EvaluateRequest.DESCRIPTOR.fields_by_name
    assert (fields["target"].number, fields["explain"].number) == (6, 7)
    assert fields["priority"].number == 8
    x = np.random.default_rng(5).normal(size=(3, 3)).astype(np.float32)
    request = pb.EvaluateRequest(
        x=tensors.to_tensor(x), model="mimo", derivative=pb.INTEGRATED_GRADIENTS, target=1,
        explain=pb.Explain(steps=8), priority=pb.HIGH,
    )  # fmt: skip
    decoded = pb.EvaluateRequest.FromString(request.SerializeToString())
    assert decoded.priority == pb.HIGH and decoded.target == 1 and decoded.explain.steps == 8
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        got = stub.Evaluate(request, timeout=30, metadata=[("x-gradserve-client", "explainer")])
        with pytest.raises(grpc.RpcError) as info:
            stub.Evaluate(pb.EvaluateRequest(x=tensors.to_tensor(x), model="mimo", priority=7),
                          timeout=10)  # fmt: skip
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority 7 is unknown" in info.value.details()
    want = unbatched(engines["mimo"], IG, x, steps=8, target=1)
    assert_same_answer(tensors.from_tensor(got.attributions), want.attributions)
    delta = tensors.from_tensor(got.delta)
    assert_same_answer(delta, want.delta)
