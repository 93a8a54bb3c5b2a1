"""`make explain-demo`: serve the bundled digits classifier, explain a few digits through the
SDK (integrated gradients and SmoothGrad of the predicted class) and draw them as a PNG grid.

One column per digit: the input, the integrated-gradients attributions (red pushes towards the
predicted class, blue away from it), and the SmoothGrad magnitude. The digits are held-out
examples written by `make train` (demo/digits_samples.npz), so no scikit-learn is needed here.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np

from gradserve.client import AsyncGradientClient
from gradserve.server.app import GradServer
from gradserve.server.config import ServerConfig

HERE = Path(__file__).resolve().parent
SAMPLES = HERE / "digits_samples.npz"
OUT = HERE.parent / "docs" / "explanations.png"


async def explain(digits: list[int], steps: int, samples: int) -> dict[str, np.ndarray]:
    """Serve `digits` on a free loopback port and ask for both explanations of each."""
    data = np.load(SAMPLES)
    x, labels = data["x"][digits], data["label"][digits]
    config = ServerConfig(
        model="digits", port=0, metrics_port=0, http_port=0, xla=False, drain_seconds=5
    )
    async with (
        GradServer(config) as server,
        AsyncGradientClient(f"127.0.0.1:{server.port}", timeout=60) as client,
    ):
        logits = (await client.evaluate(x, "none")).y
        predicted = logits.argmax(axis=1)
        ig, sg = [], []
        for row, cls in zip(x, predicted, strict=True):
            one = row[None]
            ig.append(await client.integrated_gradients(one, steps=steps, target=int(cls)))
            sg.append(await client.smooth_grad(one, samples=samples, noise=0.15, seed=0,
                                               target=int(cls)))  # fmt: skip
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return {
        "x": x[..., 0],
        "label": labels,
        "predicted": predicted,
        "probability": probabilities[np.arange(len(x)), predicted],
        "ig": np.concatenate([r.attributions for r in ig])[..., 0],
        "delta": np.concatenate([r.delta for r in ig]),
        "gap": np.array([r.y[0, c] for r, c in zip(ig, predicted, strict=True)]),
        "sg": np.concatenate([r.attributions for r in sg])[..., 0],
    }


def draw(found: dict[str, np.ndarray], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(found["x"])
    fig, axes = plt.subplots(3, n, figsize=(1.7 * n, 5.4), squeeze=False)
    for i in range(n):
        cls = found["predicted"][i]
        limit = np.abs(found["ig"][i]).max() or 1.0
        panels = (
            (found["x"][i], "gray_r", 0, 1,
             f"{found['label'][i]}: predicted {cls}\n({found['probability'][i]:.0%})"),
            (found["ig"][i], "RdBu_r", -limit, limit, "integrated\ngradients"),
            (np.abs(found["sg"][i]), "magma", 0, None, "|SmoothGrad|"),
        )  # fmt: skip
        for ax, (image, cmap, low, high, title) in zip(axes[:, i], panels, strict=True):
            ax.imshow(image, cmap=cmap, vmin=low, vmax=high)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default="0,2,3,5,7,8", help="which sample digits (0-9)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    digits = [int(d) for d in args.digits.split(",")]
    found = asyncio.run(explain(digits, args.steps, args.samples))
    draw(found, args.out)
    for i, d in enumerate(digits):
        print(f"digit {d}: predicted {found['predicted'][i]} "
              f"({found['probability'][i]:.0%}), IG delta {found['delta'][i]:+.2e}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
