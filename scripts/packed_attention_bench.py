"""Per-document attention for the 1.0611 record's packed rows, on one GPU (issue 19):
cuDNN's packed layout (attention.cudnn_packed_attention) against the 1.1147 record's
dense causal rows and against dense [T, T] masks.

    source scripts/device_env.sh; python3 scripts/packed_attention_bench.py --out $OUT/packed

One attention call with the model's heads (8 query, 4 KV, head dim 64, bf16),
forward and forward + backward:
  dense   48 x 2,048 causal rows (the 1.1147 record's layout);
  packed  1 x 98,304: documents of lognormal lengths (mean 700 tokens) in
          2,048-token chunks, and the worst case, 48 full chunks; folded rows
          (fold_len 2,048, segment slots per fold row 16/32/64) and unfolded
          (slots: the record's cu_seqlens bucket; packing.py says why folding);
  mask    a dense [T, T] mask at T <= 16,384: jax.nn.dot_product_attention on
          cuDNN (a bf16 bias, and its gradient), the jnp path's mask, and the
          packed layout at the same T.
Segments enter the compiled programs as arguments, as in training. Checks the
packed layout against the jnp path on two 8k slices of the row, and the full
chunks against the dense rows. Prints a table; writes packed_attention.json
under --out. Cases are skipped once --budget_s has passed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from golf_jax import attention, packing

H, K, D = 8, 4, 64
ROW, CHUNK = 98_304, 2048
MEAN_DOC_LEN, DOC_SIGMA = 700, 1.3
BUCKET = packing.DEFAULT_BUCKET_SIZE
MASK_LENGTHS, JNP_MASK_MAX, CHECK_LEN = (4096, 8192, 16384), 8192, 8192


def document_row(rng: np.random.Generator, total_len: int) -> np.ndarray:
    """cu_seqlens of a packed row cut from a stream of documents with lognormal lengths
    (mean MEAN_DOC_LEN), starting inside the first one, in CHUNK-token chunks."""
    mu = math.log(MEAN_DOC_LEN) - DOC_SIGMA ** 2 / 2
    lengths = np.maximum(1, rng.lognormal(mu, DOC_SIGMA, 4 * total_len // MEAN_DOC_LEN).astype(np.int64))
    starts = np.cumsum(lengths) - rng.integers(0, lengths[0])
    bos = starts[(starts > 0) & (starts < total_len)]
    return packing.document_segments(bos, total_len, CHUNK, BUCKET)[0]


def prefix(cu: np.ndarray, total_len: int) -> np.ndarray:
    """The segments of the row's first total_len tokens (cut at total_len)."""
    bounds = np.unique(cu)
    return packing.document_segments(bounds[bounds < total_len], total_len, CHUNK, BUCKET)[0]


def device_segments(cu: np.ndarray, total_len: int, fold_len: int, slots: int) -> packing.Segments:
    return jax.device_put(packing.make_segments(cu, total_len, fold_len, slots))


def random_qkv(B: int, T: int, seed: int):
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(kk, (B, T, h, D), jnp.bfloat16) for kk, h in zip(keys, (H, K, K, H)))


def measure(fn, *args) -> dict:
    """Compile time, the program's temporary memory and the median time of one call."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    result = {"compile_s": round(time.perf_counter() - start, 2)}
    try:
        result["temp_mb"] = round(compiled.memory_analysis().temp_size_in_bytes / 2 ** 20, 1)
    except Exception:  # noqa: BLE001 (not every backend reports it)
        pass
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    iters = max(1, min(50, int(0.05 / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            out = compiled(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / iters)
    result["ms"] = round(statistics.median(times) * 1e3, 3)
    return result


def forward_and_backward(attend, q, k, v, g, extra) -> dict:
    fwd = measure(lambda q, k, v, extra: attend(q, k, v, extra), q, k, v, extra)
    both = measure(lambda q, k, v, g, extra: jax.vjp(lambda q, k, v: attend(q, k, v, extra), q, k, v)[1](g),
                   q, k, v, g, extra)
    return {"fwd_ms": fwd["ms"], "fwd_bwd_ms": both["ms"], "compile_s": fwd["compile_s"] + both["compile_s"],
            "fwd_bwd_temp_mb": both.get("temp_mb")}


def packed(q, k, v, segments):
    return attention.causal_attention(q, k, v, "cudnn", segments=segments)


def dense_rows(q, k, v, _):
    rows = lambda x: x.reshape(-1, CHUNK, *x.shape[2:])  # noqa: E731
    return attention.causal_attention(rows(q), rows(k), rows(v), "cudnn").reshape(q.shape)


def cudnn_mask(q, k, v, ids_T):
    T = q.shape[1]
    mask_TxT = (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]) & (ids_T[:, None] == ids_T[None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask_TxT[None, None], is_causal=True, implementation="cudnn")


def jnp_mask(q, k, v, ids_T):
    return attention.causal_attention(q, k, v, "jnp", segment_ids_T=ids_T)


def cases(cu_row: np.ndarray, cu_full: np.ndarray):
    """(name, attention, T, per-call extra argument: segments or ids) in run order."""
    yield "dense 48x2048 causal (1.1147)", dense_rows, ROW, jnp.zeros(())
    for layout, cu, fold_slots in (("documents", cu_row, (16, 32, 64)), ("48 full chunks", cu_full, (2, 32))):
        for slots in fold_slots:
            yield f"packed {layout}, fold 2048 x {slots} slots", packed, ROW, (cu, CHUNK, slots)
        yield f"packed {layout}, unfolded x {cu.size - 1} slots", packed, ROW, (cu, ROW, cu.size - 1)
    for T in MASK_LENGTHS:
        cu_T = prefix(cu_row, T)
        yield f"mask T={T}: packed, fold 2048 x 32", packed, T, (cu_T, CHUNK, 32)
        yield f"mask T={T}: cuDNN dense bias", cudnn_mask, T, jnp.asarray(packing.segment_ids(cu_T, T))
        if T <= JNP_MASK_MAX:
            yield f"mask T={T}: jnp dense mask", jnp_mask, T, jnp.asarray(packing.segment_ids(cu_T, T))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def checks(cu_row: np.ndarray, cu_full: np.ndarray) -> dict:
    """The packed layout against the jnp path (float32) on two slices of the row that hold whole
    segments (from the start and from the middle), forward and gradients under one cotangent;
    the full chunks against the dense rows."""
    q, k, v, g = random_qkv(1, ROW, seed=1)
    result = {}
    segments = device_segments(cu_row, ROW, CHUNK, packing.DEFAULT_SEGMENTS_PER_FOLD)
    out, vjp = jax.vjp(jax.jit(lambda q, k, v: packed(q, k, v, segments)), q, k, v)
    grads = vjp(g)
    bounds = np.unique(cu_row)
    for lo in (0, int(bounds[np.searchsorted(bounds, ROW // 2)])):
        hi = int(bounds[np.searchsorted(bounds, lo + CHECK_LEN, side="right") - 1])
        ids = jnp.asarray(packing.segment_ids(cu_row, ROW)[lo:hi])
        part = lambda x: x[:, lo:hi].astype(jnp.float32)  # noqa: E731
        want, vjp_want = jax.vjp(jax.jit(lambda q, k, v: jnp_mask(q, k, v, ids)), part(q), part(k), part(v))
        errors = {"out": rel_err(out[:, lo:hi], want)}
        errors.update({f"d{n}": rel_err(got[:, lo:hi], w) for n, got, w in zip("qkv", grads, vjp_want(part(g)))})
        result[f"documents [{lo}, {hi}) vs jnp"] = errors
    segments = device_segments(cu_full, ROW, CHUNK, 2)
    out, vjp = jax.vjp(jax.jit(lambda q, k, v: packed(q, k, v, segments)), q, k, v)
    want, vjp_want = jax.vjp(jax.jit(lambda q, k, v: dense_rows(q, k, v, None)), q, k, v)
    errors = {"out": rel_err(out, want)}
    errors.update({f"d{n}": rel_err(a, b) for n, a, b in zip("qkv", vjp(g), vjp_want(g))})
    result["48 full chunks vs dense rows"] = errors
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/packed_attention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget_s", type=float, default=80.0,
                        help="skip the cases left after this long; the checks run after them")
    args = parser.parse_args()
    start = time.perf_counter()
    cu_row = document_row(np.random.default_rng(args.seed), ROW)
    cu_full = packing.document_segments(np.arange(0, ROW, CHUNK), ROW, CHUNK, BUCKET)[0]
    lengths = np.diff(np.unique(cu_row))
    row = {"segments": int(lengths.size), "mean_segment_len": round(float(lengths.mean()), 1),
           "full_chunks": int(np.sum(lengths == CHUNK)),
           "slots_needed_fold_2048": packing.segments_per_fold_needed(cu_row, ROW, CHUNK)}
    report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "native_gqa_packed": attention.packed_kv_offsets_follow_key_heads(), "row": row, "cases": []}
    print(f"{report['device']}, jax {jax.__version__}; packed layout with "
          f"{'native GQA' if report['native_gqa_packed'] else 'KV repeated to the query heads'}; row: {row}")
    print(f"{'case':<48} {'fwd ms':>8} {'fwd+bwd ms':>11} {'temp MB':>9} {'compile s':>10}")
    for name, attend, T, extra in cases(cu_row, cu_full):
        entry = {"case": name, "T": T}
        if time.perf_counter() - start > args.budget_s:
            entry["skipped"] = "time budget"
        else:
            try:
                if isinstance(extra, tuple):
                    extra = device_segments(extra[0], T, extra[1], extra[2])
                q, k, v, g = random_qkv(1, T, seed=0)
                entry.update(forward_and_backward(attend, q, k, v, g, extra))
            except Exception as error:  # noqa: BLE001 (a case that cuDNN or memory refuses is a result)
                entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        report["cases"].append(entry)
        if "fwd_ms" in entry:
            print(f"{name:<48} {entry['fwd_ms']:>8.3f} {entry['fwd_bwd_ms']:>11.3f} "
                  f"{entry.get('fwd_bwd_temp_mb') or float('nan'):>9.1f} {entry['compile_s']:>10.1f}", flush=True)
        else:
            print(f"{name:<48} {entry.get('skipped') or entry.get('error')}", flush=True)
    try:
        report["checks"] = checks(cu_row, cu_full)
    except Exception as error:  # noqa: BLE001
        report["checks"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    for name, errors in report["checks"].items():
        print(f"check {name}: " + (", ".join(f"{n} {e:.2e}" for n, e in errors.items())
                                  if isinstance(errors, dict) else errors))
    report["wall_s"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packed_attention.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'packed_attention.json'} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
