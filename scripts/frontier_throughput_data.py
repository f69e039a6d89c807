"""A CaseOps dataset large enough for the 1.0611 record's packed rows, for timing only.

configs/frontier.py reads one global span of 8 x 98,305 tokens a step; the embedded
CaseOps tinyshakespeare (`datasets.caseops_dataset`) has fewer train tokens than one span,
and its documents (speeches, ~58 tokens) are far shorter than FineWeb's. This tiles the
embedded train tokens to --tokens and puts a BOS at document lengths drawn lognormal
(mean --mean-doc-tokens, sigma --sigma: FineWeb-like, the lengths
scripts/packed_attention_bench.py and packing.DEFAULT_SEGMENTS_PER_FOLD assumed), so the
per-document attention sees realistic segment counts. The text repeats: a throughput
dataset, not one to learn from. With --val-tokens the val shard and its byte sidecar are tiled
the same way (BOS counts 0 bytes), so the phased TTT sees FineWeb-like documents; otherwise they
are the embedded ones. The tokenizer is the embedded data's.

    python scripts/frontier_throughput_data.py --out /tmp/frontier_data
    python train.py --config configs/frontier.py --config.data.data_dir=/tmp/frontier_data \
        --config.data.tokenizer_path=/tmp/frontier_data/tokenizer.model ...

Tooling, outside the code counted in the artifact.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf_jax import data, datasets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=12_000_000)
    ap.add_argument("--mean-doc-tokens", type=float, default=700.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--bos-id", type=int, default=1)
    ap.add_argument("--val-tokens", type=int, default=0, help="tile the val shard to this many tokens (0: as is)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = datasets.caseops_dataset()
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = np.concatenate([data.read_shard(p) for p in sorted(src.glob("fineweb_train_*.bin"))])
    tokens, starts = tiled_documents(text[text != args.bos_id], args, rng)
    data.write_shard(out / "fineweb_train_000000.bin", tokens)
    report(out, "train", tokens, starts)
    if args.val_tokens:
        val, counts = (data.read_shard(next(src.glob(f"fineweb_val_{k}000000.bin"))) for k in ("", "bytes_"))
        keep = val != args.bos_id
        both = np.stack([val[keep], counts[keep]])  # tokens and their bytes, tiled in step
        (val, counts), starts = tiled_documents(both, args, rng, args.val_tokens)
        counts[starts] = 0  # BOS: 0 bytes
        data.write_shard(out / "fineweb_val_000000.bin", val)
        data.write_shard(out / "fineweb_val_bytes_000000.bin", counts)
        report(out, "val", val, starts)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or (not args.val_tokens and f.name.startswith("fineweb_val_")):
            shutil.copyfile(f, out / f.name)


def tiled_documents(text: np.ndarray, args, rng, n: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """text [..., L] (tokens first) tiled along its last axis to n tokens (default --tokens),
    with BOS at lognormal document lengths; and the documents' starts."""
    n = n or args.tokens
    tiled = np.concatenate([text] * -(-n // text.shape[-1]), axis=-1)[..., :n].copy()
    mu = np.log(args.mean_doc_tokens) - args.sigma ** 2 / 2  # lognormal with this mean
    lengths = np.maximum(1, rng.lognormal(mu, args.sigma, n // 10).astype(np.int64))
    starts = np.cumsum(np.concatenate([[0], lengths]))
    starts = starts[starts < n]
    tiled.reshape(-1, n)[0, starts] = args.bos_id
    return tiled, starts


def report(out: Path, split: str, tokens: np.ndarray, starts: np.ndarray) -> None:
    doc_lengths = np.diff(np.append(starts, tokens.shape[-1]))
    print(f"{out}: {tokens.shape[-1]:,} {split} tokens, {starts.size:,} documents, mean {doc_lengths.mean():.0f} "
          f"median {np.median(doc_lengths):.0f} max {doc_lengths.max():,} tokens")


if __name__ == "__main__":
    main()
