"""The phased LoRA TTT's time on the 1.0611 record's validation set on N GPUs, projected from
the one-GPU step times of scripts/ttt_step_bench.py (issue 20). Tooling, outside the code
counted in the artifact.

On N GPUs golf_jax splits each batch's 64 rows over the GPUs (golf_jax/ttt_lora.py): every GPU
runs every chunk step of the schedule with 64 / N rows. A step of 8 rows is not 1/8 of a step
of 64 (launches, small matmuls), so the bench times steps of 64 / N rows on one GPU, one per
window width (and of lora_compact_rows / N rows at the whole context's width, for the steps
of compacted batches: `ttt_schedule.compact_from`), and this script sums them over the schedule
of one GPU's share: 50,000 documents of the record's 47,851,520 tokens, lengths lognormal (sigma 1, as
scripts/frontier_throughput_data.py draws them), batches of 64 sorted by length, windows as
`ttt_schedule.window_width` pads them (the config's lora_window_widths or lora_min_window). With
--ranks R (one GPU a rank, as the reference's: `ttt_schedule.rank_schedule`), each GPU runs its own rank's batches, 64
rows a step (not compacted), and waits at each phase for the slowest: the chunk steps take the
sum over the phases' eras of the slowest rank's steps. A width the bench did not
time takes the time of the next wider one it did (an upper bound). The global phases: their
tokens (the documents `ttt_schedule.rank_schedule` gives them) in steps of one 32,768-token chunk, at the bench's
one-GPU step time, split over the GPUs with ttt.global_data_parallel (each GPU 1/N of the
tokens; the gradients' all-reduce not counted). Compilation: the programs one at a time, as the
bench measured them (for those it compiled only in threads, side by side, their contended times:
an upper bound); `compile_ahead` overlaps them (docs/performance.md). Host time between
steps is not counted (the loop prepares the next inputs while the GPU runs).

    python scripts/ttt_projection.py BENCH.json [BENCH2.json ...] [--gpus 8] [--reload-s 33.1] [--config.ttt.x=y]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf_jax import cli, ttt_schedule  # noqa: E402
from golf_jax.config import TTTConfig  # noqa: E402

RECORD_DOCS, RECORD_TOKENS = 50_000, 47_851_520  # the validation set (SPEC.md section 5)


def record_lengths(seed: int = 0) -> np.ndarray:
    """50,000 document lengths (BOS to the next BOS, included), lognormal, the record's mean."""
    mean = RECORD_TOKENS / RECORD_DOCS
    rng = np.random.default_rng(seed)
    return np.maximum(2, rng.lognormal(np.log(mean) - 0.5, 1.0, RECORD_DOCS).astype(np.int64))


def phase_tokens(lengths: np.ndarray, t: TTTConfig, ranks: int) -> int:
    """Tokens the global phases train on, all phases together (`ttt_schedule.rank_schedule`'s)."""
    return int(sum(lengths[docs].sum() for docs in ttt_schedule.rank_schedule(lengths, t, ranks).phases))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", nargs="+", help="scripts/ttt_step_bench.py outputs (JSON)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=1, help="1: each batch split over the GPUs; the GPU count: a rank each")
    ap.add_argument("--reload-s", type=float, default=0.0, help="the artifact's reload, added to the total")
    cfg, args = cli.parse(ap, default_config=str(Path(__file__).resolve().parents[1] / "configs" / "frontier.py"))
    t = cfg.ttt
    if args.ranks not in (1, args.gpus):
        raise SystemExit("--ranks: 1 or the GPU count")
    if args.ranks > 1 and t.lora_compact_rows:
        t = dataclasses.replace(t, lora_compact_rows=0)  # a rank's steps: the whole batch on its GPU
    share = args.gpus if args.ranks == 1 else 1  # a GPU's share of a step's rows
    chunks, global_step = [], None
    for path in args.bench:
        b = json.loads(Path(path).read_text())
        chunks += b["chunk"]
        global_step = b.get("global") or global_step
    # a (rows, width) timed both alone and in threads: the alone figures (its compile time uncontended)
    timed = {(c["rows"], c["width"]): c for c in sorted(chunks, key=lambda c: "compile_s" in c)}
    compile_of = {k: c.get("lower_s", 0.0) + c.get("compile_s", c.get("compile_s_in_threads", 0.0))
                  for k, c in timed.items()}

    def bench_for(rows: int, width: int) -> tuple[int, int]:
        wider = [w for r, w in sorted(timed) if r == rows // share and w >= width]
        if not wider:
            raise SystemExit(f"no bench time for rows={rows // share} at width {width} or wider")
        return rows // share, wider[0]

    lengths = record_lengths()
    steps = collections.Counter(ttt_schedule.chunk_steps(lengths, t))  # by (batch rows, window width)
    lines, chunk_s, compile_s = [], 0.0, 0.0
    for rows, width in sorted(steps, key=lambda k: (-k[0], k[1])):
        source = bench_for(rows, width)
        seconds = steps[rows, width] * timed[source]["step_ms"] / 1e3
        chunk_s += seconds
        compile_s += compile_of[source]
        lines.append(f"| {source[0]} | {width} | {steps[rows, width]:,} | {timed[source]['step_ms']:.2f}"
                     f"{'' if source[1] == width else f' (at {source[1]})'} | {seconds:.1f} |")
    if args.ranks > 1:  # each GPU its rank's batches; every phase waits for the slowest
        schedule = ttt_schedule.rank_schedule(lengths, t, args.ranks)
        step_s = {w: timed[bench_for(t.lora_batch_docs, w)]["step_ms"] / 1e3 for _, w in steps}
        slowest = [max(sum(step_s[ttt_schedule.chunk_window(ci, t)] for _, docs in batches
                           for ci in range(ttt_schedule.chunk_count(lengths[docs] - 1, t))) for batches in era)
                   for era in schedule.eras]
        idle = sum(len(schedule.eras[0]) * m for m in slowest) - chunk_s  # chunk_s: every step once, on some GPU
        lines.append(f"\n{args.ranks} ranks, one a GPU: the slowest rank's steps in each of the {len(slowest)} eras "
                     f"between the phases: {', '.join(f'{m:.1f}' for m in slowest)} s; the GPUs wait {idle / args.ranks:.1f} s "
                     f"on average")
        chunk_s = sum(slowest)
    tokens = phase_tokens(lengths, t, args.ranks)
    phases_s = 0.0
    if global_step:
        split = args.gpus if t.global_data_parallel else 1
        phases_s = tokens / global_step["tokens"] * global_step["step_ms"] / 1e3 / split
        compile_s += global_step["compile_s"]
    total = compile_s + chunk_s + phases_s + args.reload_s
    print(f"one GPU's share of {args.gpus} ({args.ranks} ranks): {t.lora_batch_docs // share} rows a step "
          f"({t.lora_compact_rows // share} once compacted); {RECORD_DOCS:,} documents, mean "
          f"{lengths.mean():.0f} tokens; windows "
          f"{t.lora_window_widths or f'powers of two from lora_min_window {t.lora_min_window}'}\n")
    print("| rows a GPU | window | steps | ms a step | s |\n|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"\nchunk steps {chunk_s:.1f} s; global phases {phases_s:.1f} s ({tokens:,} tokens"
          f"{', split over the GPUs' if t.global_data_parallel else ', every GPU all'}); compilation, one program "
          f"at a time, {compile_s:.1f} s; reload {args.reload_s:.1f} s; total {total:.1f} s")


if __name__ == "__main__":
    main()
