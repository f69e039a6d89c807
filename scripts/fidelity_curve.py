"""Does golf_jax train like the PyTorch reference on a GPU? Train it from the
reference's own seed-314 weights on the embedded tinyshakespeare shards with
the settings of the reference's 60-step curves, then compare every step.

    # one run (on a GPU; any --config.<field>=<value> overrides after --)
    python scripts/fidelity_curve.py train --out runs/fid_default
    python scripts/fidelity_curve.py train --out runs/fid_bf16 -- --config.model.residual_dtype=compute
    # the table, the acceptance checks against the reference mean and a plot
    python scripts/fidelity_curve.py compare runs/fid_default runs/fid_default2 \\
        --reference ../shared/fixtures/reference/curves/record_60steps_tinyshakespeare.json \\
        --plot docs/img/fidelity_default.png

    # against a chosen set of reference runs (here: this machine's), the runs' own mean checked too
    python scripts/fidelity_curve.py compare runs/D5 runs/D6 --reference CURVES.json runs/ref_a/reference.log \
        runs/ref_b/reference.log --mean-of runs/ref_a/reference.log runs/ref_b/reference.log --with-mean

A reference source is the curves JSON (several runs) or a reference log
(`run_tinyshakespeare.sh` writes reference.log; such a log is labelled by its
folder, and may also be given as a run, to check the reference like golf_jax).
The mean and the validation ranges of the checks are those of --mean-of
(default: every --reference). `train` trains GOLF_TREE (default: this
repository), e.g. `git archive HEAD` unpacked while the working tree is edited;
RESIDUAL_NORM_SEMANTICS="round_dnorm=0,round_ds=0" trains with those rounding
choices of kernels/residual_norm.py (`SEMANTICS`), as the gradient probe
(scripts/residual_grad_probe.py) tries them; RESIDUAL_NORM_HALF=forward (or backward) with one
half of that kernel only, RESIDUAL_NORM_HALF=stream with no kernel but the residual stream
rounded where the kernel rounds it, stream_blocks and stream_both rounding more of it
(scripts/residual_norm_halves.py).
The device call that ran the figures of docs/fidelity.md is
scripts/device_fidelity.sh.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("GOLF_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared"))
# The settings of the reference curves (their JSON's "settings").
SETTINGS = ["--config.iterations=60", "--config.warmup_steps=2", "--config.warmdown_iters=20",
            "--config.max_wallclock_seconds=0", "--config.val_batch_tokens=16384", "--config.val_loss_every=20",
            "--config.seed=314", "--config.train_log_every=1", "--config.checkpoint_every=0"]
# Acceptance of a golf_jax curve against the reference mean (issue 16).
MAX_MEAN_ABS, MAX_WARMDOWN_MEAN, MAX_WORST, VAL_MARGIN = 0.004, 0.005, 0.025, 0.005
WARMDOWN_FROM = 41  # steps 41-60: the lr multiplier falls from 1 to 0.05


class Curve:
    """One run: train loss per step, val (loss, bpb) per step, post-EMA (loss, bpb)."""

    def __init__(self, label: str, train: dict[int, float], val: dict[int, tuple[float, float]],
                 post_ema: tuple[float, float] | None):
        self.label, self.train, self.val, self.post_ema = label, train, val, post_ema


def golf_run(run_dir: Path) -> Curve:
    if run_dir.is_file():  # a reference log, checked like a golf_jax run (e.g. an H200 run against H100 runs)
        return reference_log(run_dir)
    records = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    val = {r["step"]: (r["loss"], r["bpb"]) for r in records if r["kind"] == "val"}
    summary = run_dir / "summary.json"
    post = None
    if summary.exists():
        s = json.loads(summary.read_text())
        post = (s["final_val_loss"], s["final_val_bpb"])
    return Curve(run_dir.name, train, val, post)


def reference_log(path: Path) -> Curve:
    text = path.read_text(errors="replace")
    train = {int(s): float(v) for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:([\d.]+)", text, re.M)}
    val = {int(s): (float(l), float(b)) for s, l, b in
           re.findall(r"^step:(\d+)/\d+ val_loss:([\d.]+) val_bpb:([\d.]+)", text, re.M)}
    m = re.search(r"DIAGNOSTIC post_ema val_loss:([\d.]+) val_bpb:([\d.]+)", text)
    # run_tinyshakespeare.sh always writes reference.log: name such a run by its folder.
    label = path.parent.name if path.stem == "reference" and path.parent.name else path.stem
    return Curve(label, train, val, (float(m[1]), float(m[2])) if m else None)


def reference_curves(path: Path) -> list[Curve]:
    if path.suffix != ".json":
        return [reference_log(path)]
    runs = json.loads(path.read_text())["runs"]
    return [Curve(f"ref {name}", {int(k): v for k, v in r["train_loss"].items()},
                  {int(k): tuple(v) for k, v in r["val"].items()},
                  tuple(r["post_ema"]) if r.get("post_ema") else None) for name, r in runs.items()]


def mean_curve(curves: list[Curve]) -> Curve:
    steps = sorted(set.intersection(*(set(c.train) for c in curves)))
    return Curve("reference mean", {s: float(np.mean([c.train[s] for c in curves])) for s in steps}, {}, None)


def mean_of_runs(curves: list[Curve], label: str) -> Curve:
    """The per-step mean of several runs (train loss, validation loss and bpb, post-EMA): one
    implementation's expected curve, to check against the reference mean besides each single run."""
    steps = sorted(set.intersection(*(set(c.train) for c in curves)))
    points = sorted(set.intersection(*(set(c.val) for c in curves)))
    post = (tuple(float(np.mean([c.post_ema[i] for c in curves])) for i in (0, 1))
            if all(c.post_ema for c in curves) else None)
    return Curve(label, {s: float(np.mean([c.train[s] for c in curves])) for s in steps},
                 {s: tuple(float(np.mean([c.val[s][i] for c in curves])) for i in (0, 1)) for s in points}, post)


def compare(a: Curve, b: Curve, split: int = WARMDOWN_FROM) -> dict:
    """Relative differences of a's train loss to b's, per step; "early" and
    "late" are the steps before `split` and from it on (default: the warmdown's)."""
    steps = sorted(set(a.train) & set(b.train))
    rel = {s: (a.train[s] - b.train[s]) / b.train[s] for s in steps}
    early = [rel[s] for s in steps if s <= split - 1]
    late = [rel[s] for s in steps if s >= split]
    worst = max(steps, key=lambda s: abs(rel[s]))
    return {"steps": len(steps), "early_min": min(early), "early_max": max(early), "worst": rel[worst],
            "worst_step": worst, "mean_abs": float(np.mean(np.abs(list(rel.values())))),
            "warmdown_mean": float(np.mean(late)) if late else float("nan"), "rel": rel}


def pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def table(rows: list[tuple[str, dict]], early: str = "steps 1-40", late: str = "steps 41-60") -> str:
    """compare()'s figures, a row per pair; `early` and `late` name its two phases."""
    out = [f"| pair | range over {early} | worst step | mean abs | mean over {late} |",
           "|---|---|---|---|---|"]
    for name, c in rows:
        out.append(f"| {name} | {pct(c['early_min'])} .. {pct(c['early_max'])} | {pct(c['worst'])} "
                   f"(step {c['worst_step']}) | {100 * c['mean_abs']:.2f}% | {pct(c['warmdown_mean'])} |")
    return "\n".join(out)


def val_checks(golf: Curve, refs: list[Curve]) -> tuple[list[str], bool]:
    """Validation bpb at each logged step and after the EMA, against the
    reference runs' range widened by VAL_MARGIN on each side."""
    lines, ok = [], True
    points = sorted(set(golf.val) & set.intersection(*(set(r.val) for r in refs)))
    named = [(f"step {s}", golf.val[s][1], [r.val[s][1] for r in refs]) for s in points if s > 0]
    if golf.post_ema and all(r.post_ema for r in refs):
        named.append(("post-EMA", golf.post_ema[1], [r.post_ema[1] for r in refs]))
    for name, got, theirs in named:
        lo, hi = min(theirs) * (1 - VAL_MARGIN), max(theirs) * (1 + VAL_MARGIN)
        good = lo <= got <= hi
        ok &= good
        lines.append(f"  val_bpb {name}: {got:.4f}, reference {min(theirs):.4f}..{max(theirs):.4f} "
                     f"(allowed {lo:.4f}..{hi:.4f}) {'ok' if good else 'OUT'}")
    return lines, ok


def plot(golfs: list[Curve], refs: list[Curve], mean: Curve, path: Path,
         shade_from: int = WARMDOWN_FROM, shade_label: str = "warmdown") -> None:
    """Train losses (top) and each run's relative difference to `mean` (bottom),
    the steps from `shade_from` on shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, height_ratios=(3, 2))
    for r in refs:
        s = sorted(r.train)
        ax.plot(s, [r.train[k] for k in s], color="0.6", lw=0.8)
        dx.plot(s, [100 * compare(r, mean)["rel"][k] for k in s], color="0.6", lw=0.8)
    ax.plot([], [], color="0.6", lw=0.8, label="reference runs")
    dx.plot([], [], color="0.6", lw=0.8, label="reference runs")
    for i, g in enumerate(golfs):
        s = sorted(g.train)
        ax.plot(s, [g.train[k] for k in s], color=f"C{i}", lw=1.0, label=g.label)
        rel = compare(g, mean)["rel"]
        dx.plot(sorted(rel), [100 * rel[k] for k in sorted(rel)], color=f"C{i}", lw=1.0, label=g.label)
    ax.set_ylabel("train loss (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    dx.axhline(0, color="k", lw=0.6)
    for y in (-2.5, 2.5):
        dx.axhline(y, color="k", lw=0.4, ls=":")
    dx.axvspan(shade_from, max(mean.train), color="0.9", zorder=0)
    dx.set_xlabel(f"step (shaded: {shade_label})")
    against = mean.label if len(refs) == 1 else "reference mean" if mean.label == "reference mean" else "mean of refs"
    dx.set_ylabel(f"vs {against} (%)")
    dx.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def cmd_compare(args) -> int:
    # Every reference source once; the mean and the validation ranges are those of the runs of
    # --mean-of (default: every --reference); the pair table lists all of them.
    loaded: dict[Path, list[Curve]] = {}
    for p in [*args.reference, *(args.mean_of or [])]:
        loaded.setdefault(p.resolve(), reference_curves(p))
    refs = [c for curves in loaded.values() for c in curves]
    against = [c for p in args.mean_of for c in loaded[p.resolve()]] if args.mean_of else refs
    golfs = [golf_run(d) for d in args.runs]
    if args.labels:
        for g, label in zip(golfs, args.labels):
            g.label = label
    mean = mean_curve(against)
    mean.label = f"mean of {', '.join(c.label for c in against)}" if args.mean_of else mean.label
    rows = [(f"{a.label} vs {b.label}", compare(a, b)) for a, b in itertools.combinations(refs, 2)]
    rows += [(f"{a.label} vs {b.label}", compare(a, b)) for a, b in itertools.combinations(golfs, 2)]
    rows += [(f"{g.label} vs {r.label}", compare(g, r)) for g in golfs for r in refs]
    print(table(rows))
    for a, b in itertools.combinations(golfs, 2):
        if a.train == b.train and a.val == b.val and a.post_ema == b.post_ema:
            print(f"{a.label} and {b.label}: bit-identical losses at every step")
    print()
    if args.with_mean and len(golfs) > 1:  # checked like the runs, after the pair table
        golfs.append(mean_of_runs(golfs, f"mean of {len(golfs)} runs"))
    print(table([(f"{g.label} vs {mean.label}", compare(g, mean)) for g in golfs]))
    all_ok, summary = True, {}
    for g in golfs:
        c = compare(g, mean)
        checks = [(c["mean_abs"] <= MAX_MEAN_ABS, f"mean abs {100 * c['mean_abs']:.2f}% <= {100 * MAX_MEAN_ABS}%"),
                  (abs(c["warmdown_mean"]) <= MAX_WARMDOWN_MEAN,
                   f"mean over steps 41-60 {pct(c['warmdown_mean'])} within +-{100 * MAX_WARMDOWN_MEAN}%"),
                  (abs(c["worst"]) <= MAX_WORST, f"worst step {pct(c['worst'])} within +-{100 * MAX_WORST}%")]
        lines, val_ok = val_checks(g, against)
        ok = all(k for k, _ in checks) and val_ok
        summary[g.label] = {**{k: v for k, v in c.items() if k != "rel"}, "pass": ok,
                            "checks": [t + (" ok" if k else " OUT") for k, t in checks] + lines}
        all_ok &= ok
        print(f"\n{g.label}: {'PASS' if ok else 'FAIL'} against the {mean.label}")
        for k, text in checks:
            print(f"  {text}: {'ok' if k else 'OUT'}")
        print("\n".join(lines))
    if args.plot:
        plot(golfs, against, mean, args.plot)
        print(f"\nwrote {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"pairs": {name: {k: v for k, v in c.items() if k != "rel"}
                                                   for name, c in rows},
                                         "against": mean.label, "vs_mean": summary}, indent=1))
    return 0 if all_ok else 1


def cmd_train(args, overrides: list[str]) -> int:
    data = Path(os.environ.get("GOLF_JAX_SHARED_DATA", SHARED / "data")).resolve()
    init = (args.init or SHARED / "fixtures/reference/record_init_seed314_bf16bits.npz").resolve()
    # The tree to train: this repository, or GOLF_TREE (e.g. `git archive HEAD` of it, unpacked, while
    # the working tree is being edited); its train.py and configs/, with "." on PYTHONPATH.
    tree = Path(os.environ.get("GOLF_TREE", Path(__file__).resolve().parents[1])).resolve()
    cmd = [sys.executable, "train.py", "--config", args.config,
           f"--config.data_dir={data / 'tinyshakespeare_sp1024'}",
           f"--config.tokenizer_path={data / 'tokenizers/fineweb_1024_bpe.model'}",
           f"--config.init_from={init}", f"--config.output_dir={args.out.resolve()}", *SETTINGS, *overrides,
           "--no-quantize", "--no-progress"]
    prelude = []  # train.py with the residual-mix kernel changed first (the kernel's experiments)
    semantics = os.environ.get("RESIDUAL_NORM_SEMANTICS", "")
    if semantics:  # e.g. "round_dnorm=0,round_ds=0": kernels/residual_norm.SEMANTICS changed
        changes = {k: bool(int(v)) for k, v in (item.split("=") for item in semantics.split(","))}
        prelude.append(f"from kernels import residual_norm as r; assert set({changes!r}) <= set(r.SEMANTICS); "
                       f"r.SEMANTICS.update({changes!r})")
    half = os.environ.get("RESIDUAL_NORM_HALF", "")
    if half:  # one of residual_norm_halves.HALVES (scripts/residual_norm_halves.py)
        prelude.append("sys.path.insert(0, 'scripts'); import residual_norm_halves; "
                       f"residual_norm_halves.patch({half!r})")
    if prelude:
        wrap = "; ".join(["import runpy, sys", *prelude,
                          "sys.argv[0] = 'train.py'; runpy.run_path('train.py', run_name='__main__')"])
        cmd = [sys.executable, "-c", wrap, *cmd[2:]]
    print(f"(in {tree}) " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=tree)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, those after "--": passed on to the run)."""
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def main() -> int:
    argv, overrides = split_overrides(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one 60-step golf_jax run from the reference's init (GPU)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--config", default="configs/record.py")
    t.add_argument("--init", type=Path, help="reference-named initial weights (default: the fixtures' seed 314)")
    c = sub.add_parser("compare", help="the per-step table, the acceptance checks and a plot")
    c.add_argument("runs", nargs="+", type=Path,
                   help="golf_jax run directories (train.jsonl, summary.json), or reference logs to check the same way")
    c.add_argument("--reference", nargs="+", type=Path,
                   default=[SHARED / "fixtures/reference/curves/record_60steps_tinyshakespeare.json"],
                   help="the curves JSON and/or reference logs")
    c.add_argument("--mean-of", nargs="+", type=Path,
                   help="the curves JSON and/or reference logs whose runs form the mean and the validation "
                        "ranges of the checks (default: every --reference); listed in the pair table too")
    c.add_argument("--labels", nargs="+")
    c.add_argument("--with-mean", action="store_true",
                   help="also check the per-step mean of the runs given (one more curve, 'mean of N runs')")
    c.add_argument("--plot", type=Path)
    c.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    return cmd_train(args, overrides) if args.cmd == "train" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
