"""The phased LoRA TTT's time on the 1.0611 record's validation set on N GPUs, projected from
the one-GPU step times of scripts/ttt_step_bench.py (issue 20). Tooling, outside the code
counted in the artifact.

On N GPUs with R ranks (ttt.lora_ranks; the record's: one a GPU) golf_jax runs the ranks'
batches in step, a group of R batches at a time (`ttt_lora.rank_groups`), their R x 64 rows
split over the GPUs: every GPU runs every chunk step of the groups with 64 R / N rows (64 with
one rank a GPU; 64 / N with one rank, which splits each batch). A step of 8 rows is not 1/8 of
a step of 64 (launches, small matmuls), so the bench times steps of 64 R / N rows on one GPU,
one per window width, and this script sums them over the schedule of one GPU's share: 50,000
documents of the record's 47,851,520 tokens, lengths lognormal (sigma 1, as
scripts/frontier_throughput_data.py draws them), batches of 64 sorted by length, a group's
steps its longest batch's, windows as `ttt_lora.window_width` pads them with the config's
lora_min_window. A width the bench did not
time takes the time of the next wider one it did (an upper bound). The global phases: their
tokens (the documents `ttt_lora.run` chooses) in steps of one 32,768-token chunk, at the bench's
one-GPU step time, split over the GPUs with ttt.global_data_parallel (each GPU 1/N of the
tokens; the gradients' all-reduce not counted). Compilation: the programs one at a time, as the
bench measured them (for those it compiled only in threads, side by side, their contended times:
an upper bound); `compile_ahead` overlaps them (docs/performance.md). Host time between
steps is not counted (the loop prepares the next inputs while the GPU runs).

    python scripts/ttt_projection.py BENCH.json [BENCH2.json ...] [--gpus 8] [--reload-s 33.1]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf_jax import cli, ttt_lora  # noqa: E402
from golf_jax.config import TTTConfig  # noqa: E402

RECORD_DOCS, RECORD_TOKENS = 50_000, 47_851_520  # the validation set (SPEC.md section 5)


def record_lengths(seed: int = 0) -> np.ndarray:
    """50,000 document lengths (BOS to the next BOS, included), lognormal, the record's mean."""
    mean = RECORD_TOKENS / RECORD_DOCS
    rng = np.random.default_rng(seed)
    return np.maximum(2, rng.lognormal(np.log(mean) - 0.5, 1.0, RECORD_DOCS).astype(np.int64))


def steps_by_width(lengths: np.ndarray, t: TTTConfig, ranks: int) -> collections.Counter:
    """How many chunk steps of each window width the schedule runs (each GPU runs them all)."""
    groups = ttt_lora.rank_groups(ttt_lora.batch_order(lengths, t.lora_batch_docs), ranks)
    return collections.Counter(ttt_lora.chunk_window(ci, t) for group in groups
                               for ci in range(ttt_lora.group_chunk_count(lengths, group, t)))


def phase_tokens(lengths: np.ndarray, t: TTTConfig) -> int:
    """Tokens the global phases train on, all phases together, chosen as `ttt_lora.run`
    chooses them (`phase_boundaries`, `phase_documents`)."""
    boundaries, scored, total = ttt_lora.phase_boundaries(len(lengths), t), [], 0
    for b_index, docs in ttt_lora.batch_order(lengths, t.lora_batch_docs):
        if not boundaries or boundaries[-1] == 0:
            break
        scored += [(b_index, row, doc) for row, doc in enumerate(docs)]
        if len(scored) >= boundaries[0]:
            total += int(lengths[ttt_lora.phase_documents(scored, boundaries.pop(0))].sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", nargs="+", help="scripts/ttt_step_bench.py outputs (JSON)")
    ap.add_argument("--config", default="configs/frontier.py")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=0, help="ttt.lora_ranks (0: the config's)")
    ap.add_argument("--reload-s", type=float, default=0.0, help="the artifact's reload, added to the total")
    args = ap.parse_args()
    t = cli.load_config_file(args.config).ttt
    ranks = args.ranks or t.lora_ranks
    rows = ranks * t.lora_batch_docs // args.gpus
    chunks, global_step = [], None
    for path in args.bench:
        b = json.loads(Path(path).read_text())
        chunks += [c for c in b["chunk"] if c["rows"] == rows]
        global_step = b.get("global") or global_step
    # a width timed both alone and in threads: the alone figures (its compile time uncontended)
    timed = {c["width"]: c for c in sorted(chunks, key=lambda c: "compile_s" in c)}
    compile_of = {w: c.get("lower_s", 0.0) + c.get("compile_s", c.get("compile_s_in_threads", 0.0))
                  for w, c in timed.items()}

    lengths = record_lengths()
    steps = steps_by_width(lengths, t, ranks)
    lines, chunk_s, compile_s = [], 0.0, 0.0
    for width in sorted(steps):
        wider = [w for w in sorted(timed) if w >= width]
        if not wider:
            raise SystemExit(f"no bench time for rows={rows} at width {width} or wider")
        source = timed[wider[0]]
        seconds = steps[width] * source["step_ms"] / 1e3
        chunk_s += seconds
        compile_s += compile_of[wider[0]]
        lines.append(f"| {width} | {steps[width]:,} | {source['step_ms']:.2f}"
                     f"{'' if wider[0] == width else f' (at {wider[0]})'} | {seconds:.1f} |")
    tokens = phase_tokens(lengths, t)
    phases_s = 0.0
    if global_step:
        split = args.gpus if t.global_data_parallel else 1
        phases_s = tokens / global_step["tokens"] * global_step["step_ms"] / 1e3 / split
        compile_s += global_step["compile_s"]
    total = compile_s + chunk_s + phases_s + args.reload_s
    print(f"one GPU's share of {args.gpus}, {ranks} ranks: {rows} rows a step; {RECORD_DOCS:,} documents, mean "
          f"{lengths.mean():.0f} tokens; lora_min_window {t.lora_min_window}\n")
    print("| window | steps | ms a step | s |\n|---|---|---|---|")
    print("\n".join(lines))
    print(f"\nchunk steps {chunk_s:.1f} s; global phases {phases_s:.1f} s ({tokens:,} tokens"
          f"{', split over the GPUs' if t.global_data_parallel else ', every GPU all'}); compilation, one program "
          f"at a time, {compile_s:.1f} s; reload {args.reload_s:.1f} s; total {total:.1f} s")


if __name__ == "__main__":
    main()
