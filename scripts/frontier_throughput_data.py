"""A CaseOps dataset large enough for the 1.0611 record's packed rows, for timing only.

configs/frontier.py reads one global span of 8 x 98,305 tokens a step; the embedded
CaseOps tinyshakespeare (`datasets.caseops_dataset`) has fewer train tokens than one span,
and its documents (speeches, ~58 tokens) are far shorter than FineWeb's. This tiles the
embedded train tokens to --tokens and puts a BOS at document lengths drawn lognormal
(mean --mean-doc-tokens, sigma --sigma: FineWeb-like, the lengths
scripts/packed_attention_bench.py and packing.DEFAULT_SEGMENTS_PER_FOLD assumed), so the
per-document attention sees realistic segment counts. The text repeats: a throughput
dataset, not one to learn from. Val shard, byte sidecar and tokenizer are the embedded ones.

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
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = datasets.caseops_dataset()
    text = np.concatenate([data.read_shard(p) for p in sorted(src.glob("fineweb_train_*.bin"))])
    text = text[text != args.bos_id]
    tokens = np.resize(text, args.tokens)
    rng = np.random.default_rng(args.seed)
    mu = np.log(args.mean_doc_tokens) - args.sigma ** 2 / 2  # lognormal with this mean
    lengths = np.maximum(1, rng.lognormal(mu, args.sigma, args.tokens // 10).astype(np.int64))
    starts = np.cumsum(np.concatenate([[0], lengths]))
    starts = starts[starts < args.tokens]
    tokens[starts] = args.bos_id
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data.write_shard(out / "fineweb_train_000000.bin", tokens)
    for f in src.iterdir():
        if f.name.startswith(("fineweb_val_", "tokenizer")):
            shutil.copyfile(f, out / f.name)
    doc_lengths = np.diff(np.append(starts, args.tokens))
    print(f"{out}: {args.tokens:,} train tokens, {starts.size:,} documents, mean {doc_lengths.mean():.0f} "
          f"median {np.median(doc_lengths):.0f} max {doc_lengths.max():,} tokens; val and tokenizer from {src}")


if __name__ == "__main__":
    main()
