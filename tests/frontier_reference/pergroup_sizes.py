"""Bytes of the per-group artifact (golf_jax.artifact_pergroup) under each
group compressor, next to the 1.0611 reference's own serializer on the same
tensors. A measurement, not a test (minutes with lrzip):

    GOLF_JAX_FIXTURES=... GOLF_JAX_REFERENCE=... PYTHONPATH=. \
        python tests/frontier_reference/pergroup_sizes.py [record|frontier] [compressor|reference ...]

(default: record brotli lzma lrzip zpaq reference; the environment as for the tests).
Each compressor is timed coding the groups one after another (workers=1, as
the reference) and side by side (one thread per group, golf_jax's default),
writing and reading; the two must give the same bytes.

Tensor sets (no trained record-size checkpoint exists here):
  record    the 1.1147 record's seed-314 initial weights (the reference
            fixture record_init_seed314_bf16bits.npz), unbanked to the
            reference's names; its zero-initialised output projections
            (attn.proj, mlp.proj) are replaced by Gaussian rows, else they
            quantise to all zeros;
  frontier  Gaussian rows in the 1.0611 record's shapes (vocab 8192,
            11 layers, d 512, kv 256, MLP 2048), seed 0.
Both are quantised as the frontier does (per-row SDClip scale
fp16(k std(row) / cr), k 13 attention, 11.5 MLP, 14 embedding; cr 31, 63
for the int7 tok_emb) but by plain rounding, not GPTQ: the integer
statistics of random rows, not of trained ones (trained rows are more alike,
which is what the row reordering exploits).
Needs torch and the reference source for the reference's column, brotli,
and lrzip (binary) / zpaq (PyPI) for those compressors.
"""

from __future__ import annotations

import io
import os
import sys
import time

import numpy as np

from golf_jax import artifact_pergroup as ap
from tests.conftest import FIXTURES, reference_source

K_SIGMA = {"attn": 13.0, "mlp": 11.5, "tok_emb": 14.0}


def sdclip_rows(w: np.ndarray, k: float, cr: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.maximum(k * w.std(axis=1) / cr, 1e-10).astype(np.float16)
    q = np.clip(np.round(w / s.astype(np.float32)[:, None]), -cr, cr).astype(np.int8)
    return q, s


def add_matrix(out: dict, name: str, w: np.ndarray, k: float, cr: int = 31) -> None:
    out[name + ".q"], out[name + ".scale"] = sdclip_rows(w.astype(np.float32), k, cr)


def record_tensors() -> dict:
    z = np.load(FIXTURES / "record_init_seed314_bf16bits.npz")
    f = {k: (z[k].astype(np.uint32) << 16).view(np.float32) for k in z.files}
    rng, n, out = np.random.default_rng(314), 11, {}
    add_matrix(out, "tok_emb.weight", f["tok_emb.weight"], K_SIGMA["tok_emb"], 63)
    for i in range(n):
        b = f"blocks.{i}."
        add_matrix(out, b + "attn.c_q.weight", f["qo_bank"][i], K_SIGMA["attn"])
        add_matrix(out, b + "attn.proj.weight", rng.standard_normal((512, 512)), K_SIGMA["attn"])
        add_matrix(out, b + "attn.c_k.weight", f["kv_bank"][i], K_SIGMA["attn"])
        add_matrix(out, b + "attn.c_v.weight", f["kv_bank"][n + i], K_SIGMA["attn"])
        add_matrix(out, b + "mlp.fc.weight", f["mlp_up_bank"][i], K_SIGMA["mlp"])
        add_matrix(out, b + "mlp.proj.weight", rng.standard_normal((512, 1536)), K_SIGMA["mlp"])
    for k, v in f.items():  # passthrough: the small tensors, fp16 (bigram and VE are not in the frontier)
        if v.size <= 65536 and not k.startswith(("bigram", "ve_")):
            out[k] = v.astype(np.float16)
    return out


def frontier_tensors() -> dict:
    rng, out = np.random.default_rng(0), {}
    d, kv, hidden = 512, 256, 2048
    add_matrix(out, "tok_emb.weight", rng.standard_normal((8192, d)), K_SIGMA["tok_emb"], 63)
    for i in range(11):
        b = f"blocks.{i}."
        for name, shape in (("attn.c_q", (d, d)), ("attn.c_k", (kv, d)), ("attn.c_v", (kv, d)), ("attn.proj", (d, d))):
            add_matrix(out, b + name + ".weight", rng.standard_normal(shape), K_SIGMA["attn"])
        add_matrix(out, b + "mlp.fc.weight", rng.standard_normal((hidden, d)), K_SIGMA["mlp"])
        add_matrix(out, b + "mlp.proj.weight", rng.standard_normal((d, hidden)), K_SIGMA["mlp"])
        for name in ("attn_scale", "mlp_scale"):
            out[b + name] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float16)
    return out


def reference_serializer():
    """The reference's _serialize_pergroup with its own helpers (torch needed)."""
    import collections
    import os
    import subprocess

    import torch

    names = ("_GROUP_ORDER", "_SIMSORT_KEYS", "_PACK_MAGIC", "_similarity_sort_l1", "_lrzip_compress",
             "_pack_streams", "_serialize_pergroup")
    ns = {"collections": collections, "io": io, "os": os, "subprocess": subprocess, "torch": torch}
    exec(reference_source("frontier_1855/train_gpt.py", *names), ns)
    return ns, torch


def reference_bytes(arrays: dict) -> dict:
    import tempfile

    import brotli
    ns, torch = reference_serializer()
    result = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out["reference pergroup (lrzip)"] = (len(ns["_serialize_pergroup"](result, {}, 11, tmp)),
                                             time.perf_counter() - t0)
    buf = io.BytesIO()
    torch.save({"w": result, "m": {}}, buf)
    t0 = time.perf_counter()
    out["reference brotli (torch.save, one stream)"] = (len(brotli.compress(buf.getvalue(), quality=11)),
                                                         time.perf_counter() - t0)
    return out


def main(argv: list[str]) -> None:
    which = argv[0] if argv else "record"
    compressors = argv[1:] or ["brotli", "lzma", "lrzip", "zpaq", "reference"]
    arrays = record_tensors() if which == "record" else frontier_tensors()
    raw = sum(np.asarray(v).nbytes for v in arrays.values())
    print(f"tensor set {which}: {len(arrays)} arrays, {raw:,} raw bytes", flush=True)
    for name in compressors:
        if name == "reference":
            for label, (n, dt) in reference_bytes(arrays).items():
                print(f"{label}: {n:,} bytes in {dt:.1f} s", flush=True)
            continue
        times, blobs = {}, {}
        for workers in (1, None):
            t0 = time.perf_counter()
            blobs[workers] = blob = ap.serialize(arrays, {}, compressor=name, workers=workers)
            t1 = time.perf_counter()
            back, _ = ap.deserialize(blob, workers=workers)
            times[workers] = (t1 - t0, time.perf_counter() - t1)
            assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
        if name != "lrzip":  # lrzip's bytes may depend on its threads (serialize's docstring)
            assert blobs[1] == blobs[None], name
        sizes = ap.stream_sizes(blob)
        groups = sum(v for k, v in sizes.items() if k.endswith(".q"))
        (w1, r1), (wn, rn) = times[1], times[None]
        print(f"golf_jax pergroup ({name}): {len(blob):,} bytes (groups {groups:,}, remainder {sizes['remainder']:,}, "
              f"permutations {sizes['permutations']:,}); write {w1:.1f} s in a row, {wn:.1f} s side by side; "
              f"read {r1:.1f} s / {rn:.1f} s ({os.cpu_count()} CPUs)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
