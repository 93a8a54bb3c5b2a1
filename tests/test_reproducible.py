"""Reproducible answers: with --deterministic, a row's outputs and derivative are the same in
every bit whatever else is in its batch.

Hypothesis draws the model (dense or conv, float32 or float64, XLA or not), the kind, the
batch size and the rows' values, and compares every row of the batch with the same row
computed alone, bit for bit; the same test runs again in child processes with the kernels
capped at each lower vector level this CPU has (SSE4.1, AVX, AVX2), so that one machine
proves every level it can reach. The self-check's tests plant an engine that computes one
position of its tiles another way: it must refuse to answer, and a server to start. The
server tests mix many callers' rows in both server shapes (one process, and two frontends
with an engine process) and compare every served row with the row asked alone, and the two
shapes with each other.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import httpx
import keras
import numpy as np
import pytest
from conftest import (
    TEST_CONFIG,
    GatedEngine,
    RunningServer,
    ServerProcess,
    exited,
    free_port,
    start_gradserve,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planted import position_dependent

from gradserve.client import AsyncGradientClient
from gradserve.server.core.contract import ENGINE_KINDS
from gradserve.server.core.selfcheck import VECTOR_LEVELS, SelfCheckFailed, supported_levels
from gradserve.server.engine.batching import TILE_ROWS
from gradserve.server.engine.compiled import TensorFlowEngine
from gradserve.wire.kinds import Derivative

MAX_BATCH = 3 * TILE_ROWS - 5  # one, two and three tiles; the XLA ladder up to four
FAMILIES = ("dense", "conv")
DTYPES = ("float32", "float64")
_MODELS = Path(tempfile.mkdtemp(prefix="gradserve-reproducible-"))


def build(family: str, dtype: str) -> keras.Model:
    """A small seeded model of the family: dense 6 -> 3, or conv on 5x5x2 images -> 2."""
    keras.utils.set_random_seed(11)
    if family == "dense":
        layers = [keras.Input(shape=(6,), dtype=dtype),
                  keras.layers.Dense(24, activation="tanh", dtype=dtype),
                  keras.layers.Dense(24, activation="softplus", dtype=dtype),
                  keras.layers.Dense(3, dtype=dtype)]  # fmt: skip
    else:
        layers = [keras.Input(shape=(5, 5, 2), dtype=dtype),
                  keras.layers.Conv2D(4, 3, activation="tanh", dtype=dtype),
                  keras.layers.Flatten(dtype=dtype),
                  keras.layers.Dense(2, activation="tanh", dtype=dtype)]  # fmt: skip
    return keras.Sequential(layers)


@functools.cache
def engine_for(family: str, dtype: str, xla: bool) -> TensorFlowEngine:
    """One deterministic engine per drawn model, kept for the session (tracing costs)."""
    path = _MODELS / f"{family}-{dtype}.keras"
    if not path.exists():
        build(family, dtype).save(path)
    return TensorFlowEngine(path, xla=xla, max_batch_size=MAX_BATCH, deterministic=True)


def vector_shape(engine: TensorFlowEngine, kind: Derivative) -> tuple[int, ...]:
    return engine.output_shape if kind is Derivative.VJP else engine.input_shape


def bits(outputs, row: int) -> list[bytes]:
    """The bytes of one row's output and derivative."""
    arrays = [outputs.y] if outputs.dy_dx is None else [outputs.y, outputs.dy_dx]
    return [np.ascontiguousarray(a[row]).tobytes() for a in arrays]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_rows_bits_do_not_depend_on_its_batch(data):
    engine = engine_for(
        data.draw(st.sampled_from(FAMILIES), label="family"),
        data.draw(st.sampled_from(DTYPES), label="dtype"),
        data.draw(st.booleans(), label="xla"),
    )
    kind = data.draw(st.sampled_from(ENGINE_KINDS), label="kind")
    n = data.draw(st.integers(1, MAX_BATCH), label="batch size")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    spread = data.draw(st.sampled_from([1e-3, 1.0, 1e3]), label="rows' magnitude")
    rng = np.random.default_rng(seed)
    x = (spread * rng.standard_normal((n, *engine.input_shape))).astype(engine.numpy_dtype)
    v = rng.standard_normal((n, *vector_shape(engine, kind))).astype(engine.numpy_dtype)
    v = v if kind.needs_vector else None
    batch = engine.run(kind, x, v)
    for row in range(n):  # every position of every tile the batch took
        alone = engine.run(kind, x[row : row + 1], None if v is None else v[row : row + 1])
        assert bits(batch, row) == bits(alone, 0), f"row {row} of {n} differs from it alone"


def _lower_levels() -> list:
    """The vector levels below this CPU's own (its own is this process's run)."""
    return supported_levels()[:-1]


@pytest.mark.parametrize("level", VECTOR_LEVELS[:-1], ids=lambda level: level.name)
def test_a_rows_bits_do_not_depend_on_its_batch_at_every_lower_vector_level(level):
    """The property test and the self-check again, in a child process whose oneDNN and XLA
    kernels are capped at `level`: an AVX-512 machine proves the AVX2 case too."""
    if level not in _lower_levels():
        pytest.skip(f"{level.name} is not below this CPU's own vector level")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
         "-k", "bits_do_not_depend_on_its_batch and not every_lower"],
        env={**os.environ, **level.cap()}, capture_output=True, text=True, timeout=400,
        cwd=os.path.dirname(__file__),
    )  # fmt: skip
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert "1 passed" in child.stdout, child.stdout[-2000:]


# --- the self-check -------------------------------------------------------------------------


def test_the_self_check_refuses_an_engine_that_computes_a_position_another_way():
    path = _MODELS / "dense-float32.keras"
    if not path.exists():
        build("dense", "float32").save(path)
    planted = position_dependent(TensorFlowEngine)(
        path, xla=False, max_batch_size=8, deterministic=True
    )
    x = np.zeros((1, *planted.input_shape), planted.numpy_dtype)
    with pytest.raises(SelfCheckFailed) as refused:
        planted.run(Derivative.GRADIENT, x)
    message = str(refused.value)
    expected = (f"gradient computed the same row with other bits at position {TILE_ROWS - 1} "
                f"of its {TILE_ROWS}-row tile")  # fmt: skip
    assert expected in message, message
    assert "--deterministic off" in message and "ONEDNN_MAX_CPU_ISA=" in message, message
    with pytest.raises(SelfCheckFailed):  # still refused: nothing was answered meanwhile
        planted.run(Derivative.GRADIENT, x)
    assert engine_for("dense", "float32", False).run(Derivative.GRADIENT, x).dy_dx.shape == (1, 6)


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_server_whose_engine_fails_the_self_check_refuses_to_start(mimo_model_path, frontends):
    script = Path(__file__).with_name("planted.py")
    process = start_gradserve(
        free_port(), "--model", str(mimo_model_path), "--frontends", frontends,
        "--metrics-port", str(free_port()), script=script,
    )  # fmt: skip
    stderr = exited(process, timeout=240)
    assert process.returncode == 1, stderr[-3000:]
    assert "--deterministic on cannot keep its promise for model 'mimo'" in stderr, stderr[-3000:]
    assert f"position {TILE_ROWS - 1} of its {TILE_ROWS}-row tile" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


# --- through the server: many callers' rows mixed, both server shapes -------------------

REQUESTS = [  # (kind, options): every kind, k tangents and an explanation
    ("none", {}),
    ("gradient", {}),
    ("gradient", {"target": 1}),
    ("jacobian", {}),
    ("vjp", {}),
    ("jvp", {}),
    ("jvp", {"k": 3}),
    ("hessian", {}),
    ("hvp", {}),
    ("integrated_gradients", {"steps": 6}),
]
CALLERS, GROUPS_PER_CALLER = 12, 4


def inputs(seed: int, rows: int, kind: str, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the 3-input mimo model and the vector its kind takes (k of them per row)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3)).astype(np.float32)
    width = 2 if kind == "vjp" else 3
    v = rng.normal(size=(rows, width) if k is None else (rows, k, width)).astype(np.float32)
    return x, v


async def ask(client: AsyncGradientClient, kind: str, options: dict, x, v):
    """One request; the answer's arrays."""
    target = options.get("target")
    if kind == "integrated_gradients":
        got = await client.integrated_gradients(x, steps=options["steps"], model="mimo")
        return [got.y, got.attributions, got.delta]
    needs_v = kind in ("vjp", "jvp", "hvp")
    got = await client.evaluate(x, kind, v=v if needs_v else None, target=target, model="mimo")
    return [got.y] if got.dy_dx is None else [got.y, got.dy_dx]


def plan() -> list[tuple]:
    """Each caller's groups: (caller, kind, options, x, v), groups of 1-5 rows, every request
    kind interleaved across callers."""
    groups = []
    for caller in range(CALLERS):
        for group in range(GROUPS_PER_CALLER):
            kind, options = REQUESTS[(caller + group) % len(REQUESTS)]
            seed = 1000 * caller + group
            x, v = inputs(seed, 1 + seed % 5, kind, options.get("k"))
            groups.append((caller, kind, options, x, v))
    return groups


async def mixed(target: str, groups: list[tuple]) -> list:
    """Every group's answer, sent by CALLERS concurrent callers: [group][array][row] bytes."""
    async with AsyncGradientClient(target, timeout=60) as client:

        async def caller_task(caller: int) -> dict[int, list]:
            mine = [(i, group) for i, group in enumerate(groups) if group[0] == caller]
            return {i: await ask(client, *group[1:]) for i, group in mine}

        answered: dict[int, list] = {}
        for answers in await asyncio.gather(*(caller_task(c) for c in range(CALLERS))):
            answered.update(answers)
    return [_row_bytes(answered[i]) for i in range(len(groups))]


async def alone(target: str, groups: list[tuple]) -> list:
    """The same rows asked one by one with nothing else in flight, in the same layout."""
    out = []
    async with AsyncGradientClient(target, timeout=60) as client:
        for _, kind, options, x, v in groups:
            rows = [await ask(client, kind, options, x[i : i + 1], v[i : i + 1])
                    for i in range(len(x))]  # fmt: skip
            joined = [np.concatenate(parts) for parts in zip(*rows, strict=True)]
            out.append(_row_bytes(joined))
    return out


def _row_bytes(arrays: list[np.ndarray]) -> list[list[bytes]]:
    return [[np.ascontiguousarray(row).tobytes() for row in a] for a in arrays]


@pytest.fixture(scope="module")
def mimo_deterministic(mimo_model_path):
    engine = TensorFlowEngine(mimo_model_path, xla=True, max_batch_size=64, deterministic=True)
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def one_process_answers(mimo_deterministic) -> tuple[list, list, int]:
    """One process's mixed answers, its rows alone, and how many engine calls the mixed
    requests took."""
    groups = plan()
    recorded = GatedEngine(mimo_deterministic)
    config = replace(TEST_CONFIG, max_batch_size=64, deterministic=True)
    with RunningServer(config, recorded) as running:
        together = asyncio.run(mixed(running.target, groups))
        calls = len(recorded.calls)
        return together, asyncio.run(alone(running.target, groups)), calls


def test_one_process_answers_every_row_as_it_would_alone(one_process_answers):
    together, by_itself, calls = one_process_answers
    assert calls < len(plan()), "no engine call mixed two requests: nothing was compared"
    assert together == by_itself


def test_frontends_answer_every_row_as_it_would_alone_and_as_one_process(
    mimo_model_path, one_process_answers
):
    groups = plan()
    served = ServerProcess("--frontends", "2", "--max-batch-size", "64", "--model",
                           str(mimo_model_path), "--model-name", "mimo",
                           GRADSERVE_XLA="on", GRADSERVE_DETERMINISTIC="on")  # fmt: skip
    try:
        together = asyncio.run(mixed(served.target, groups))
        assert together == asyncio.run(alone(served.target, groups))
        metrics = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10).text
        passed = 'gradserve_deterministic_selfcheck{process="engine",model="mimo",version="1"} 1.0'
        assert passed in metrics
    finally:
        assert served.stop() == 0
    assert together == one_process_answers[0]
