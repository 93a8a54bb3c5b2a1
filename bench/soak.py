"""`make soak`: mixed unary, stream and bad traffic for a set time; server RSS every 30 s.

Passes when, after the warm-up, the server's RSS never exceeds its post-warm-up value by more
than 5 %. Writes the result between the soak markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import SERVE, SIDE_PORTS_OFF, Server, write_section  # noqa: E402
from gradserve.v1 import gradserve_pb2 as pb  # noqa: E402
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc  # noqa: E402
from gradserve.wire.tensors import to_tensor  # noqa: E402

BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
KINDS = (pb.GRADIENT, pb.JACOBIAN, pb.NONE)


def random_request(rng: random.Random) -> pb.EvaluateRequest:
    """Mostly good requests of 1-64 rows; about 5 % malformed (NaN, wrong width, bad bytes)."""
    x = np.float32([[rng.random()] for _ in range(rng.randint(1, 64))])
    request = pb.EvaluateRequest(x=to_tensor(x), derivative=rng.choice(KINDS))
    roll = rng.random()
    if roll < 0.02:
        request.x.data = np.float32([[np.nan]] * len(x)).tobytes()
    elif roll < 0.04:
        request.x.shape[:] = [len(x) // 2 + 1, 2]
    elif roll < 0.05:
        request.x.data = b"\1\2\3"
    return request


async def unary_caller(stub, rng, until: float, codes: Counter) -> None:
    while time.monotonic() < until:
        try:
            await stub.Evaluate(random_request(rng), timeout=30)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            codes[error.code().name] += 1


async def streamer(stub, rng, until: float, codes: Counter) -> None:
    while time.monotonic() < until:
        messages = [random_request(rng) for _ in range(rng.randint(1, 200))]
        try:
            async for response in stub.EvaluateStream(iter(messages), timeout=60):
                codes["stream:" + ("error" if response.HasField("error") else "OK")] += 1
        except grpc.aio.AioRpcError as error:
            codes["stream-end:" + error.code().name] += 1


async def traffic(target: str, seconds: float, codes: Counter) -> None:
    until = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        rngs = [random.Random(i) for i in range(20)]
        await asyncio.gather(
            *(unary_caller(stub, rngs[i], until, codes) for i in range(16)),
            *(streamer(stub, rngs[16 + i], until, codes) for i in range(4)),
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument("--warmup-samples", type=int, default=2, help="samples before baseline")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    server = Server(
        "soak",
        [*SERVE, *SIDE_PORTS_OFF, "--frontends", "1"],
        health=True,
    )
    codes: Counter = Counter()
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    try:
        load = asyncio.new_event_loop()
        task = load.create_task(traffic(server.target, args.minutes * 60, codes))
        while not task.done():
            load.run_until_complete(asyncio.wait({task}, timeout=args.sample_seconds))
            samples.append((time.monotonic() - started, server.rss_mb()))
            print(
                f"{samples[-1][0]:7.0f} s  RSS {samples[-1][1]:7.1f} MB  {dict(codes)}", flush=True
            )
        task.result()
    finally:
        server.stop()
    baseline = samples[min(args.warmup_samples, len(samples) - 1)][1]
    peak_after = max(rss for _, rss in samples[args.warmup_samples :] or samples[-1:])
    growth = (peak_after - baseline) / baseline * 100
    unexpected = {
        k: v
        for k, v in codes.items()
        if k not in ("OK", "INVALID_ARGUMENT", "stream:OK", "stream:error")
    }
    text = render(args, samples, baseline, peak_after, growth, codes)
    print(text)
    if not args.no_write:
        write(text)
    return 0 if growth <= 5.0 and not unexpected else 1


def render(args, samples, baseline, peak, growth, codes) -> str:
    rows = "\n".join(f"| {t:.0f} | {rss:.1f} |" for t, rss in samples)
    total = sum(codes.values())
    return (
        f"Soak of {args.minutes:g} min: 16 unary callers and 4 streams of random 1-64-row "
        f"requests over all derivative kinds, about 5 % malformed; {total:,} requests "
        f"({', '.join(f'{k} {v:,}' for k, v in sorted(codes.items()))}).\n\n"
        f"RSS after warm-up {baseline:.1f} MB, highest after it {peak:.1f} MB: growth "
        f"{growth:+.2f} % (limit 5 %): {'passed' if growth <= 5 else 'FAILED'}.\n\n"
        f"| seconds | server RSS (MB) |\n|---:|---:|\n{rows}"
    )


def write(text: str) -> None:
    write_section(BEGIN, END, "Soak", text)


if __name__ == "__main__":
    sys.exit(main())
