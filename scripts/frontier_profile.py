"""Where the 1.0611 record's micro-batch time goes, on one GPU (issue 19): a device profile
of loss + gradient of one packed 98,304-token row (configs/frontier.py), before and after
the layer loop, at several segment-slot counts, and of one packed attention call alone
against the 1.1147 record's dense causal rows, kernel by kernel.

    source scripts/device_env.sh; python3 scripts/frontier_profile.py --out $OUT/fprof \
        [--slots 16 8] [--config.fusion_kernels=norm_rope,xsa,softcap_ce]

The row's documents are scripts/packed_attention_bench.py's (lognormal lengths, mean 700
tokens, in 2,048-token chunks); the tokens are uniform ids (timing, not learning). Prints
each profile's categories and top kernels (golf_jax.tools.bench's table); writes
frontier_profile.json and the traces under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packed_attention_bench import CHUNK, ROW, dense_rows, device_segments, document_row, packed, random_qkv  # noqa: E402

from golf_jax import cli, model, packing  # noqa: E402
from golf_jax.tools import bench, profiling  # noqa: E402


def grad_profile(params, cfg, segments, looping: bool, out_dir: Path, repeats: int) -> dict:
    row = segments.ids_BxT.shape[-1]
    x = jax.random.randint(jax.random.key(2), (1, row), 0, cfg.model.vocab_size, jnp.int32)
    y = jax.random.randint(jax.random.key(3), (1, row), 0, cfg.model.vocab_size, jnp.int32)
    segs = packing.Segments(*(jnp.asarray(a) for a in segments))
    grad = jax.jit(lambda p, x, y, s: jax.value_and_grad(model.loss)(p, cfg.model, x, y, looping=looping, segments=s))
    t0 = time.perf_counter()
    compiled = grad.lower(params, x, y, segs).compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    prof = profiling.profile_call(lambda: compiled(params, x, y, segs), out_dir, repeats=max(1, repeats // 4), hlo_text=hlo)
    prof["fusion_traffic"] = profiling.fusion_traffic(prof["kernels"], profiling.hlo_fusion_bytes(hlo))
    prof["compile_s"] = compile_s
    timing = bench.time_call(lambda: compiled(params, x, y, segs), warmup=1, repeats=repeats)
    prof["median_ms"] = timing["median_s"] * 1e3
    stats = jax.devices()[0].memory_stats() or {}  # the process's peak so far (one program a process: its own)
    prof["peak_bytes"] = stats.get("peak_bytes_in_use")
    return prof


def attention_profile(attend, extra, row: int, out_dir: Path) -> dict:
    q, k, v, g = random_qkv(1, row, seed=0)
    fn = jax.jit(lambda q, k, v, g, extra: jax.vjp(lambda q, k, v: attend(q, k, v, extra), q, k, v)[1](g))
    prof = profiling.profile_call(lambda: fn(q, k, v, g, extra), out_dir, repeats=5)
    prof["median_ms"] = bench.time_call(lambda: fn(q, k, v, g, extra), repeats=20)["median_s"] * 1e3
    return prof


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/frontier_profile")
    parser.add_argument("--slots", type=int, nargs="+", default=[16, 8], help="segment slots per fold row")
    parser.add_argument("--no-looped", action="store_true", help="skip the looped program")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (a quarter of them traced)")
    parser.add_argument("--row", type=int, default=ROW, help="tokens of the packed row (smaller: a CPU dry run)")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention-only profiles")
    cfg, args = cli.parse(parser, argv, default_config=str(Path(__file__).resolve().parents[1] / "configs" / "frontier.py"))
    out = Path(args.out)
    cu = document_row(np.random.default_rng(0), args.row)
    needed = packing.segments_per_fold_needed(cu, args.row, CHUNK)
    n_segments = int(np.unique(cu).size - 1)
    slots = sorted({max(s, needed) for s in args.slots}, reverse=True)
    print(f"the row: {n_segments} segments, {needed} slots per fold needed; profiling slots {slots}")
    results: dict = {"device": jax.devices()[0].device_kind, "segments": n_segments, "slots_needed": needed,
                     "profile": {}}
    if not args.no_attention:
        results["profile"][f"attention dense {args.row // CHUNK}x{CHUNK}"] = attention_profile(
            dense_rows, jnp.zeros(()), args.row, out / "attn_dense")
        for m in slots:
            results["profile"][f"attention packed {m} slots"] = attention_profile(
                packed, device_segments(cu, args.row, CHUNK, m), args.row, out / f"attn_{m}")
    params = bench.perturbed_params(cfg)
    for m in slots:
        segments = packing.make_segments(cu, args.row, CHUNK, m)
        for looping in (False,) if args.no_looped or m != slots[0] else (False, True):
            name = f"grad {m} slots" + (", looped" if looping else "")
            results["profile"][name] = grad_profile(params, cfg, segments, looping,
                                                      out / name.replace(" ", "_").replace(",", ""), args.repeats)
            print(f"{name}: {results['profile'][name]['median_ms']:.2f} ms (compiled in "
                  f"{results['profile'][name]['compile_s']:.1f} s; peak {results['profile'][name]['peak_bytes']} B "
                  "in the process so far)", flush=True)
    for name, prof in results["profile"].items():
        print(f"{name}: median {prof['median_ms']:.3f} ms")
    bench.print_profiles(results)
    out.mkdir(parents=True, exist_ok=True)
    for prof in results["profile"].values():
        prof.pop("kernels", None)
    (out / "frontier_profile.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
