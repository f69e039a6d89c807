"""Overlay the training-loss curves of several runs (their train.jsonl), with
the largest absolute difference to the first run, e.g. the same config on 1
and 2 GPUs against a second seed on 1 GPU.

    python scripts/overlay_losses.py runs/g1 runs/g2 runs/g1_seed2 --labels "1 GPU" "2 GPUs" "1 GPU, seed 2" \
        --out docs/img/scaling_loss.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from fidelity_curve import golf_run  # a sibling script: the one train.jsonl reader


def losses(run_dir: Path) -> dict[int, float]:
    return golf_run(run_dir).train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.labels or [str(r) for r in args.runs]
    curves = [losses(r) for r in args.runs]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Top: the curves (they lie on each other); bottom: each minus the first, where seed noise shows.
    fig, (ax, dx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 2))
    for i, (label, c) in enumerate(zip(labels, curves)):
        steps = sorted(c)
        ax.plot(steps, [c[s] for s in steps], lw=0.9, label=label)
        if i:
            common = [s for s in steps if s in curves[0]]
            dx.plot(common, [c[s] - curves[0][s] for s in common], lw=0.8, color=f"C{i}", label=label)
    ax.set_ylabel("train loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    dx.axhline(0, color="C0", lw=0.8)
    dx.set_xlabel("step")
    dx.set_ylabel(f"minus {labels[0]}")
    dx.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    base = curves[0]
    for label, c in zip(labels[1:], curves[1:]):
        common = sorted(set(base) & set(c))
        diff = np.abs(np.array([c[s] - base[s] for s in common]))
        print(f"{label} vs {labels[0]}: {len(common)} common steps, max |diff| {diff.max():.4f}, "
              f"mean |diff| {diff.mean():.4f}, last step {common[-1]}: {c[common[-1]]:.4f} vs {base[common[-1]]:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
