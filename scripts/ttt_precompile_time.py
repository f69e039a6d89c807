"""The phased LoRA TTT's compilation alone (issue 20): `ttt_lora.precompile`, what the pipeline
runs beside the artifact's reload and what the TTT waits for, timed in this fresh process for a
config's programs on its validation tokens, with the lowering of each program apart (Python, one at
a time) and the programs it compiled, with the host cores it may use (`taskset` limits them: XLA's
compilation and autotuning run on the host's cores). Run once per config variant, each in a process
of its own (JAX's in-memory caches would serve a second run).

    python scripts/ttt_precompile_time.py --out X.json [--config configs/frontier.py] [--config.x=y ...]

Tooling, outside the code counted in the artifact.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf_jax import cli, evaluate, model, ttt_lora, ttt_schedule  # noqa: E402
from golf_jax.runlog import CompileCounter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    cfg, args = cli.parse(ap, default_config=str(Path(__file__).resolve().parents[1] / "configs" / "frontier.py"))
    tokens, _, _ = evaluate.load_eval_data(cfg, None, None)
    _, lengths = ttt_schedule.find_documents(tokens, cfg.model.bos_id)
    shapes = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.key(0)))
    lowering = collections.defaultdict(float)
    lower = jax.stages.Traced.lower

    def timed_lower(self, *a, **k):  # compile_ahead lowers through jit(...).lower = trace(...).lower
        t0 = time.perf_counter()
        out = lower(self, *a, **k)
        lowering[self.fun_name] += time.perf_counter() - t0
        return out

    jax.stages.Traced.lower = timed_lower
    with CompileCounter() as compiled:
        seconds = ttt_lora.precompile(shapes, cfg, tokens)
    result = {"device": jax.devices()[0].device_kind, "host_cores": len(os.sched_getaffinity(0)), "precompile_s": seconds,
              "window_widths": cfg.ttt.lora_window_widths or f"powers of two from {cfg.ttt.lora_min_window}",
              "chunk_programs": ttt_schedule.chunk_programs(lengths, cfg.ttt), "documents": int(len(lengths)),
              "compilations": dict(compiled.names), "lowering_s": dict(lowering)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
