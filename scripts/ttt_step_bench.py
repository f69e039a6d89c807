"""The phased LoRA TTT's programs on one GPU, one at a time (issue 20): for each (rows, window
width), the chunk step's compilation and its steady time; the global SGD step's. Record-size
model from random weights (the time does not depend on their values). Each result is written
to --out as soon as it is measured, so a call stopped at its limit keeps what it finished.
The widths are timed longest first: at the record's schedule the 2,048-token windows are ~72% of
the token positions, 1,024 ~18%, 512 ~7%. The last group (--parallel-widths) is compiled in
threads, side by side, to see whether the programs' compilations overlap. With --profile, the
first (rows, width) timed is traced too, its kernels summed by category (golf_jax.tools.profiling).

    python scripts/ttt_step_bench.py --out ttt_steps.json [--rows 8 64] [--steps 10] [--config FILE] [--config.x=y]

Tooling, outside the code counted in the artifact.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf_jax import cli, model, ttt_lora, ttt_schedule  # noqa: E402


def chunk_args(params, cfg, t, width, rng):
    rows, C = t.lora_batch_docs, t.lora_chunk_tokens
    lora = ttt_lora.fresh_lora(ttt_lora.random_init_a(cfg, t.lora_rank, 0)(0, rows), cfg, t)
    opt = ttt_lora.lora_optimizer(t).init(lora)
    x = jnp.asarray(rng.integers(2, cfg.vocab_size, (rows, width)), jnp.int32)
    y = jnp.asarray(rng.integers(2, cfg.vocab_size, (rows, width)), jnp.int32)
    lo, hi = jnp.full(rows, width - C, jnp.int32), jnp.full(rows, width, jnp.int32)
    return [params, lora, opt, x, y, lo, hi, np.int32(width - C), jnp.ones(rows, jnp.float32), np.bool_(True)]


def time_steps(compiled, args, steps):
    """Seconds per call, steady (2 calls first), the LoRA and its state fed back (donated)."""
    for i in range(steps + 2):
        if i == 2:
            jax.block_until_ready(args[1])
            t0 = time.perf_counter()
        lora, opt, sums = compiled(*args)
        args[1], args[2] = lora, opt
    jax.block_until_ready(sums)
    return (time.perf_counter() - t0) / steps


def profile_step(compiled, args, out_dir: Path) -> dict:
    """The chunk step's kernels by category and its top kernels, with their HLO source lines."""
    from golf_jax.tools import profiling

    def call():
        lora, opt, sums = compiled(*args)
        args[1], args[2] = lora, opt
        return sums

    summary = profiling.profile_call(call, out_dir, repeats=3, hlo_text=compiled.as_text())
    return {k: summary[k] for k in summary if k != "trace"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--widths", type=int, nargs="*", default=[2048, 1024, 512])
    ap.add_argument("--widths-other-rows", type=int, nargs="+", default=[2048])
    ap.add_argument("--parallel-widths", type=int, nargs="*", default=[256, 128, 64])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-global", action="store_true", help="skip the global SGD step")
    ap.add_argument("--profile", help="trace the first (rows, width) timed into this folder (jax.profiler) and "
                                      "record its kernels by category (golf_jax.tools.profiling)")
    cfg, args = cli.parse(ap, default_config=str(Path(__file__).resolve().parents[1] / "configs" / "frontier.py"))
    params = model.init_params(cfg.model, jax.random.key(0))
    rng = np.random.default_rng(0)
    results: dict = {"device": jax.devices()[0].device_kind, "chunk": [], "global": None}

    def record(kind, item):
        if kind == "chunk":
            results["chunk"].append(item)
        else:
            results[kind] = item
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(kind, item, flush=True)

    for n, rows in enumerate(args.rows):
        t = dataclasses.replace(cfg.ttt, lora_batch_docs=rows)
        step = ttt_lora.chunk_step_for(cfg.model, t)
        for width in args.widths if n == 0 else args.widths_other_rows:
            a = chunk_args(params, cfg.model, t, width, rng)
            t0 = time.perf_counter()
            lowered = step.lower(*a)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            s = time_steps(compiled, a, args.steps)
            record("chunk", {"rows": rows, "width": width, "lower_s": t1 - t0, "compile_s": t2 - t1, "step_ms": 1e3 * s,
                             "positions_per_s": rows * width / s})
            if args.profile and results.get("profile") is None:
                record("profile", {"rows": rows, "width": width, **profile_step(compiled, a, Path(args.profile))})
        if n == 0 and not args.no_global:  # the global SGD step: one chunk of 16 sequences of 2,048, documents ~957 tokens
            seq, T = cfg.eval.eval_seq_len, cfg.ttt.global_chunk_tokens
            stream = rng.integers(2, cfg.model.vocab_size, T + 1).astype(np.int32)
            stream[::957] = cfg.model.bos_id
            g = ttt_lora.global_step_for(cfg.model, cfg.ttt)
            p = jax.tree.map(lambda v: jnp.array(v, copy=True), params)
            m = jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), params)
            ga = (*ttt_schedule.global_batch_rows(stream, 0, T // seq, seq, 1, cfg), jnp.float32(1e-3))
            t0 = time.perf_counter()
            compiled = g.lower(p, m, *ga).compile()
            t1 = time.perf_counter()
            for i in range(7):
                if i == 2:
                    jax.block_until_ready(p)
                    t2 = time.perf_counter()
                p, m = compiled(p, m, *ga)
            jax.block_until_ready(p)
            record("global", {"tokens": T, "compile_s": t1 - t0, "step_ms": 1e3 * (time.perf_counter() - t2) / 5})
    if args.parallel_widths:  # compiled side by side in threads, then timed
        rows = args.rows[0]
        t = dataclasses.replace(cfg.ttt, lora_batch_docs=rows)
        step = ttt_lora.chunk_step_for(cfg.model, t)
        t0 = time.perf_counter()
        pending = {w: (chunk_args(params, cfg.model, t, w, rng),) for w in args.parallel_widths}
        lowered = {w: step.lower(*a) for w, (a,) in pending.items()}
        t1 = time.perf_counter()

        def compile_timed(w):
            s = time.perf_counter()
            return w, lowered[w].compile(), time.perf_counter() - s

        with concurrent.futures.ThreadPoolExecutor(len(lowered)) as ex:
            done = list(ex.map(compile_timed, lowered))
        t2 = time.perf_counter()
        record("parallel_compile", {"rows": rows, "widths": list(lowered), "lower_s": t1 - t0, "wall_s": t2 - t1,
                                    "each_s": {w: s for w, _, s in done}})
        for w, compiled, s in done:
            st = time_steps(compiled, pending[w][0], args.steps)
            record("chunk", {"rows": rows, "width": w, "compile_s_in_threads": s, "step_ms": 1e3 * st,
                             "positions_per_s": rows * w / st})


if __name__ == "__main__":
    main()
