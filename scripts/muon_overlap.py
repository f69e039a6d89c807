"""Does XLA overlap Parallel Muon's communication with compute? One optimizer
step of the record config on every local GPU (accumulation, the banks'
reduce-scatter, Newton-Schulz on each device's slice, the all-gathers, AdamW,
EMA), under whatever XLA_FLAGS the caller set:

- its time (back-to-back steps, so dispatch is hidden as in training);
- from the optimised, scheduled HLO: each asynchronous collective's start and
  done, and how many compute instructions XLA placed between them (none: the
  collective cannot overlap anything);
- from a profile: each NCCL kernel on device 0, its start in the step, its
  length and how much of it a compute kernel runs beside.

    XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true python scripts/muon_overlap.py --out DIR [overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf_jax import cli, train  # noqa: E402
from golf_jax.tools import bench, profiling  # noqa: E402

_START = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\b([\w\-]+-start)\(")
_DONE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\b([\w\-]+-done)\(.*?%([\w.\-]+)")
_COMPUTE = re.compile(r"=.*\b(fusion|custom-call|convolution|dot)\(")


def scheduled_collectives(hlo: str) -> list[dict]:
    """Each async collective of the entry computation (the module is printed
    in schedule order): its kind and the compute instructions between its
    start and its done."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}\n")]
    lines = entry.splitlines()
    starts: dict[str, tuple[int, str]] = {}
    out = []
    for i, line in enumerate(lines):
        m = _START.match(line)
        if m:
            kind = m.group(2)
            if kind == "async-start":  # reduce-scatter is wrapped as an async computation
                called = re.search(r"calls=%?([\w.\-]+)", line)
                kind = f"async-start({called.group(1) if called else '?'})"
            starts[m.group(1)] = (i, kind)
            continue
        m = _DONE.match(line)
        if m and m.group(3) in starts:
            j, kind = starts.pop(m.group(3))
            between = sum(1 for x in lines[j + 1:i] if _COMPUTE.search(x))
            out.append({"collective": kind, "start_line": j, "compute_between": between})
    return out


def nccl_timeline(trace: Path, device_prefix: str = "/device:GPU:0") -> list[dict]:
    """Each NCCL kernel of one device: when in the step, how long, and how
    much of it a compute kernel of that device runs beside."""
    tracks, spans = profiling.trace_spans(trace)
    pid = next((p for p, n in tracks.items() if n.startswith(device_prefix)), None)
    spans = sorted((e for e in spans if e["pid"] == pid), key=lambda e: e["ts"])
    if not spans:
        return []
    t0 = spans[0]["ts"]
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in spans
               if profiling.kernel_category(e["name"]) not in ("collective", "memcpy")]
    out = []
    for e in spans:
        if profiling.kernel_category(e["name"]) != "collective":
            continue
        a, b = e["ts"], e["ts"] + e["dur"]
        beside = sum(max(0.0, min(b, y) - max(a, x)) for x, y in compute)
        out.append({"kernel": e["name"][:60], "at_ms": (a - t0) / 1e3, "ms": e["dur"] / 1e3,
                    "beside_compute_ms": beside / 1e3})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    cfg, args = cli.parse(parser, default_config="configs/record.py")
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    step, state, xs, ys = bench.optimizer_step(
        train.initial_params(cfg), cfg, lambda shape, _: rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32))
    mesh, d = xs.sharding.mesh, cfg.data
    t0 = time.perf_counter()
    compiled = step.lower(state, xs, ys, 1.0, False, False).compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    (args.out / "train_step_hlo.txt").write_text(hlo)
    box = [state]

    def run():
        box[0], loss = step(box[0], xs, ys, 1.0, False, False)
        return loss

    for _ in range(2):
        jax.block_until_ready(run())
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(args.steps):
            loss = run()
        jax.block_until_ready(loss)
        times.append((time.perf_counter() - t) / args.steps * 1e3)
    prof = profiling.profile_call(run, args.out / "trace", repeats=1)
    result = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind, "compile_s": compile_s,
        "step_ms": statistics.median(times), "step_ms_runs": times,
        "tokens_per_s_per_gpu": d.train_batch_tokens / (statistics.median(times) / 1e3) / mesh.size,
        "collectives_per_device": prof["collectives"], "categories_ms": prof["categories_ms"],
        "scheduled": scheduled_collectives(hlo), "nccl_device0": nccl_timeline(Path(prof["trace"])),
    }
    (args.out / "overlap.json").write_text(json.dumps(result, indent=1))
    print(f"XLA_FLAGS={result['xla_flags']!r}: {mesh.size} x {result['device_kind']}, step {result['step_ms']:.1f} ms "
          f"({result['tokens_per_s_per_gpu'] / 1e6:.3f} M tokens/s per GPU), compiled in {compile_s:.0f} s")
    for pid, c in prof["collectives"].items():
        print(f"  track {pid}: collectives {c['collective_ms']:.2f} ms, {c['overlapped_ms']:.2f} ms beside compute")
    for s in result["scheduled"]:
        print(f"  scheduled {s['collective'][:60]:<60} {s['compute_between']:>4} compute ops between start and done")
    for k in result["nccl_device0"]:
        print(f"  GPU0 {k['at_ms']:8.2f} ms  {k['ms']:6.3f} ms  {k['beside_compute_ms']:6.3f} beside  {k['kernel']}")


if __name__ == "__main__":
    main()
