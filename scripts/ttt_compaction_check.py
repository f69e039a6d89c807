"""The phased LoRA TTT's batch compaction (ttt.lora_compact_rows, issue 20) on one GPU: the
whole TTT over a validation text, once with configs/frontier.py's compaction and once
without, from the same weights (the config's initial weights, perturbed:
`bench.perturbed_params`; timing and agreement, not learning). Reports each run's time,
chunk steps, positions and compilations (the second run's only its own), and the two scores'
relative difference (bf16: the compacted rows' programs sum in other orders; the CPU tests
hold them to float32).

    python scripts/ttt_compaction_check.py --out DIR [--config.data.data_dir=...]

Tooling, outside the code counted in the artifact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf_jax import cli, evaluate, runlog, ttt_lora, ttt_schedule  # noqa: E402
from golf_jax.tools import bench  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    cfg, args = cli.parse(parser, argv, default_config=str(Path(__file__).resolve().parents[1] / "configs" / "frontier.py"))
    # one device; the document-masked evaluation's ranks checked by load_eval_data are not this run's
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, num_devices=1),
                              eval=dataclasses.replace(cfg.eval, document_eval_ranks=1))
    tokens, tables, _ = evaluate.load_eval_data(cfg)
    _, lengths = ttt_schedule.find_documents(tokens, cfg.model.bos_id)
    params = bench.perturbed_params(cfg)
    report = {"documents": len(lengths), "tokens": int(len(tokens)), "runs": {}}
    # compacted first: the second run finds the programs they share compiled (`ttt_lora.chunk_step_for`),
    # so compare their steps, not their compilation (two processes for that)
    for rows in (cfg.ttt.lora_compact_rows, 0):
        run_cfg = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, lora_compact_rows=rows))
        programs = ttt_schedule.chunk_programs(lengths, run_cfg.ttt)
        with runlog.CompileCounter() as compiles:
            r = ttt_lora.run(params, run_cfg, tokens, tables, progress=False)
        report["runs"][f"lora_compact_rows={rows}"] = {"programs": programs, "compiled": dict(compiles.names),
                                                       **ttt_lora.summary(r)}
        print(f"lora_compact_rows={rows}: {r.seconds:.1f} s ({r.compile_ahead_seconds:.1f} s compiling ahead), "
              f"{r.steps} chunk steps, {r.positions:,} positions, bpb {r.bpb:.8f}; programs {programs}; "
              f"compiled {dict(compiles.names)}", flush=True)
    compact, whole = report["runs"].values()
    report["bpb_relative_difference"] = compact["bpb"] / whole["bpb"] - 1
    report["steps_seconds"] = {k: v["seconds"] - v["compile_ahead_seconds"] for k, v in report["runs"].items()}
    print(f"bpb relative difference {report['bpb_relative_difference']:.2e}; seconds after compiling "
          f"{report['steps_seconds']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ttt_compaction.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
