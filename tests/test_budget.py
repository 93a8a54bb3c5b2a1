"""What admission and batch sizing measure against (gradserve.server.core.budget): the byte
budget every batcher of a server shares, and the learned engine cost per call. Plain numbers;
the batcher's use of them is tested in test_batcher.py.
"""

from __future__ import annotations

import asyncio

import pytest

from gradserve.server.core.budget import CostModel, MemoryBudget, size_text
from gradserve.server.core.errors import QueueFull, RequestTooLarge

WAIT_S = 2.0  # bound on any single wait


def test_large_requests_leave_the_small_share_of_the_budget_to_small_ones() -> None:
    memory = MemoryBudget(1000, kept_bytes=100, small_bytes=100)
    memory.reserve(850)
    with pytest.raises(QueueFull):
        memory.reserve(101)  # a large request may fill only up to 900
    memory.reserve(50)  # a small one still fits
    memory.reserve(100)
    assert memory.held == 1000
    with pytest.raises(QueueFull):
        memory.reserve(1)
    memory.release(1000)
    memory.reserve(900)
    with pytest.raises(QueueFull, match="queue full"):
        memory.reserve(101)
    with pytest.raises(ValueError):
        MemoryBudget(100, kept_bytes=100)


def test_the_kept_share_is_for_small_reservations_only() -> None:
    """A flood's 30 MB reservations must not use the share kept for 1-row calls."""
    memory = MemoryBudget.for_server(512 * 2**20)  # 32 MiB kept, for up to 8 MiB
    while memory.fits(30 * 2**20):
        memory.reserve(30 * 2**20)
    assert memory.held == 16 * 30 * 2**20 and memory.limit - memory.held >= memory.kept
    for _ in range(15):
        memory.reserve(2 * 2**20)  # small ones still fit, into the kept share
    with pytest.raises(QueueFull):
        memory.reserve(3 * 2**20)
    assert memory.fits(2 * 2**20) and not memory.fits(9 * 2**20)


def test_a_reservation_larger_than_the_limit_can_never_fit_and_holds_nothing() -> None:
    memory = MemoryBudget(1000)
    memory.reserve(400)
    with pytest.raises(RequestTooLarge, match="at most 1000 B may be queued"):
        memory.reserve(1001)
    assert memory.held == 400
    memory.hold(700)  # bytes that exist already are counted whatever the limit
    assert memory.held == 1100 and not memory.fits(1)


async def test_room_waits_until_a_release_makes_room() -> None:
    memory = MemoryBudget(100)
    memory.reserve(80)
    waiting = asyncio.ensure_future(memory.room(30))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    memory.release(10)  # 70 + 30 fits now
    await asyncio.wait_for(waiting, WAIT_S)
    await asyncio.wait_for(memory.room(1000), WAIT_S)  # could never fit: not waited for


def test_sizes_are_written_for_people() -> None:
    assert [size_text(n) for n in (512, 3584, 240 * 2**20)] == ["512 B", "3.5 KiB", "240.0 MiB"]


def test_cost_model_fits_fixed_and_per_row_cost_and_caps_on_the_ladder() -> None:
    model = CostModel()
    assert model.estimate() is None
    assert model.rows_within(0.01, 4096) == 4096  # nothing known: rows only
    for rows in (1, 8, 64, 512, 1, 64):
        model.observe(rows, 0.001 + 0.0001 * rows)
    estimate = model.estimate()
    assert estimate is not None and estimate.calls == 6
    assert estimate.fixed_s == pytest.approx(0.001, rel=1e-6)
    assert estimate.per_row_s == pytest.approx(0.0001, rel=1e-6)
    assert model.rows_within(0.011, 4096) == 100
    assert model.rows_within(0.011, 80) == 80
    ladder = [2**i for i in range(13)]
    assert model.rows_within(0.011, 4096, ladder) == 64
    assert model.rows_within(0.0005, 4096, ladder) == 1  # never less than one row


def test_one_size_only_puts_the_whole_cost_on_the_rows() -> None:
    model = CostModel()
    for _ in range(3):
        model.observe(100, 0.01)
    estimate = model.estimate()
    assert estimate is not None
    assert (estimate.fixed_s, estimate.per_row_s) == (0.0, pytest.approx(0.0001))
    assert model.rows_within(0.02, 4096) == 200
