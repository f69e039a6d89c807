"""After training: self-generated calibration, Hessians, GPTQ, pruning to the
byte budget, the artifact, and the evaluations of what it holds.

    python -m golf_jax.quantize --checkpoint runs/smoke
    python -m golf_jax.quantize --checkpoint runs/smoke/final_model --config.quant.artifact_budget_bytes=2000000

`--checkpoint` takes a run directory, its `final_model/` (the EMA weights
train.py saves) or its `checkpoints/` (the latest training state's EMA).
The config is the checkpoint's own unless `--config FILE` is given;
`--config.<field>=<value>` overrides either. `python train.py` runs this
after training, on the `final_model/` it just wrote, so a replay from the
checkpoint writes the same artifact byte for byte.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from golf_jax import (artifact, artifact_pergroup, atomic, calibration, checkpoint, code_size, distributed, evaluate,
                      param_tree, pruning, quant, quant_frontier, run_dir, ttt, ttt_lora)
from golf_jax.hessians import collect_hessians
from golf_jax import config as config_lib
from golf_jax.config import Config, ConfigError, RunConfig
from golf_jax.param_tree import Params
from golf_jax.runlog import BACKGROUND_THREADS, CompileCounter, RunLog

ARTIFACT_NAME = run_dir.ARTIFACT_NAME
def run_dir_of(checkpoint_path: str | Path) -> Path:
    path = Path(checkpoint_path).absolute()
    return path.parent if path.name in ("final_model", "checkpoints") else path


# ----------------------------------------------------------------------------- the pipeline

def _artifact_meta(cfg: Config, quant_report: dict, dataset: dict) -> dict:
    # Only what follows from the weights and the config (no times, no output paths),
    # so replays write identical bytes; and nothing the pruning search changes,
    # so the sizes it measures are the size written.
    # Where the run wrote its files is not part of the model: two runs of one
    # config in two directories make the same artifact.
    portable = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=RunConfig.output_dir))
    return {"config": config_lib.to_dict(portable), "quantization": quant_report.get("matrices", {}),
            "data": dataset}


BUDGET_STAGES = ("calibration", "hessians", "gptq")  # what budget mode counts in the wall-clock cap
UNLOOPED_CALIBRATION = ("calibration: the self-generated tokens come from the model without its layer loop (decoding "
                        "with the loop is not built; the 1.0611 record calibrates on train shards instead, issue 20); "
                        "the Hessians, the evaluations and TTT run looped")


def calibrate_and_quantize(params: param_tree.Params, cfg: Config, stage, progress: bool = False
                           ) -> tuple[quant.QuantizedModel | quant_frontier.FrontierQuantized, dict]:
    """The stages budget mode counts (BUDGET_STAGES, each inside `stage(name)`):
    calibration (quant.calib_source), Hessians, GPTQ (quant.scheme). Returns the
    quantised model (a quant_frontier.FrontierQuantized for "sdclip") and GPTQ's
    report; every result is on the host when a stage ends."""
    q = cfg.quant
    with stage("calibration"):
        calib = calibration.calibration_tokens(params, cfg, progress=progress)
    # The 1.0611 record's Hessians: Grams / batches, undamped (GPTQ damps), and the tied embedding's.
    frontier = dict(damping=0.0, per_batch=True, embedding=cfg.model.tie_embeddings) if q.scheme == "sdclip" else {}
    with stage("hessians"):
        hessians = collect_hessians(params, cfg.model, calib, q.calib_batch_size, progress=progress,
                                    looping=cfg.model.looping_after_training, **frontier)
        jax.block_until_ready(hessians)
    with stage("gptq"):
        if q.scheme == "sdclip":
            return quant_frontier.quantize_params(params, cfg.model, hessians, q)
        qmodel, quant_report = quant.quantize_params(params, cfg.model, hessians, q)
    return qmodel, quant_report


def compile_budget_stages(params: param_tree.Params, cfg: Config) -> None:
    """Run the budget stages once, untimed: everything they compile is then
    in this process's caches for the run after training."""
    calibrate_and_quantize(params, cfg, lambda name: contextlib.nullcontext())


def time_budget_stages(params: param_tree.Params, cfg: Config) -> dict[str, float]:
    """Seconds of each budget stage on these weights, as they will run after
    training: one run to compile (not timed), then one timed. The stages'
    cost depends on shapes, not values, so early weights give the final time."""
    times: dict[str, float] = {}
    compile_budget_stages(params, cfg)
    calibrate_and_quantize(params, cfg, stage_timer(times))
    return times


def stage_timer(times: dict[str, float], compiles: dict[str, int] | None = None, log=None,
                beside: dict[str, int] | None = None):
    """A `stage(name)` context manager that records each stage's seconds in
    `times` (and its XLA compilations in `compiles`, those of the evaluation's
    programs compiling beside it in `beside`, a line in `log`)."""
    @contextlib.contextmanager
    def stage(name: str):
        t0 = time.perf_counter()
        with CompileCounter() as counter:
            yield
        times[name] = time.perf_counter() - t0
        if compiles is not None:
            compiles[name] = counter.count
        if beside is not None:
            beside[name] = counter.beside_count
        if log is not None:
            log(f"[{name}] {times[name]:.1f} s")

    return stage


def budget_report(cfg: Config, train_summary: dict, times: dict[str, float], compiles: dict[str, int]) -> dict:
    """Budget mode: each stage's share of the wall-clock cap, against the reserve."""
    cap = cfg.schedule.max_wallclock_seconds
    spent = {"training": train_summary["training_s"], **{k: times[k] for k in BUDGET_STAGES}}
    total = sum(spent.values())
    reserved = (train_summary.get("budget") or {}).get("reserve_s")
    return {"cap_s": cap, "stages_s": spent, "share_of_cap": {k: v / cap for k, v in spent.items()},
            "total_s": total, "within_cap": total <= cap, "reserved_s": reserved,
            "after_training_s": total - spent["training"],
            "compilations_in_budget_stages": sum(compiles.get(k, 0) for k in BUDGET_STAGES)}


def reserve_budget(cfg: Config, params: Params, log: RunLog, saved: dict | None = None) -> dict:
    """Budget mode: how much of the wall-clock cap the stages after training
    need (schedule.quant_reserve_seconds, or timed now on these weights with
    schedule.quant_reserve_margin of headroom), and what is left for training.
    Either way the stages are compiled here, outside the cap, so after training
    they run compiled. `saved`: a resumed run's reserve, kept as it was."""
    sched = cfg.schedule
    t0 = time.perf_counter()
    # Host arrays, as train.main reloads the final model: the same argument
    # types, so what compiles here is what runs after training.
    host = jax.device_get(distributed.local_copy(params))
    if saved is not None:
        compile_budget_stages(host, cfg)
        log.line(f"budget mode: {saved['reserve_s']:.1f} s reserved as when the run began; training stops at "
                 f"{saved['training_cap_s']:.1f} s (stages compiled in {time.perf_counter() - t0:.1f} s)")
        return saved
    measured: dict[str, float] = {}
    if sched.quant_reserve_seconds > 0:
        compile_budget_stages(host, cfg)
        reserve, how = sched.quant_reserve_seconds, "configured"
    else:
        measured = time_budget_stages(host, cfg)
        reserve = sum(measured.values()) * (1 + sched.quant_reserve_margin)
        how = (", ".join(f"{k} {v:.2f} s" for k, v in measured.items())
               + f" measured (+{sched.quant_reserve_margin:.0%})")
    cap = sched.max_wallclock_seconds
    if reserve >= cap:
        raise ConfigError(f"schedule.quant_in_budget: the stages after training need {reserve:.1f} s, "
                          f"the whole wall-clock cap of {cap:.0f} s")
    log.line(f"budget mode: {reserve:.1f} s of the {cap:.0f} s cap reserved for calibration, Hessians and GPTQ "
             f"({how}; compiling{' and timing' if measured else ''} took {time.perf_counter() - t0:.1f} s, "
             f"outside the cap); training stops at {cap - reserve:.1f} s")
    return {"cap_s": cap, "reserve_s": reserve, "measured_s": measured, "training_cap_s": cap - reserve}


def budget_line(b: dict) -> str:
    return (f"budget {b['cap_s']:.0f} s: " + ", ".join(f"{k} {v:.1f} s ({b['share_of_cap'][k]:.1%})"
                                                      for k, v in b["stages_s"].items())
            + f"; total {b['total_s']:.1f} s, {'within' if b['within_cap'] else 'OVER'} the cap"
            + (f"; {b['after_training_s']:.1f} s after training against {b['reserved_s']:.1f} s reserved"
               if b["reserved_s"] is not None else ""))


def _artifact(qmodel: quant.QuantizedModel, cfg: Config, meta: dict, path: Path, stage, log, report: dict) -> None:
    """The 1.1147 record's artifact: pruned to the budget, written."""
    q = cfg.quant
    code = code_size.counted_code_bytes(cfg.quant.code_size_count)
    with stage("compress_and_prune"):
        qmodel, blob, pruned = pruning.fit_to_budget(
            qmodel, lambda qm: artifact.serialize(qm, meta, q.lzma_preset), q.artifact_budget_bytes, code)
    report["pruning"] = pruned
    if not pruned["fits"]:
        log(f"warning: the artifact does not fit even with every +-1 value pruned: {pruned['bytes']:,} bytes "
            f"against a budget of {q.artifact_budget_bytes:,}")
    with stage("write_artifact"):
        weights_bytes = atomic.write_bytes(path, blob)
    report["artifact"] = artifact.artifact_budget_report(weights_bytes, q.artifact_budget_bytes, code)
    report["artifact"]["path"] = str(path)
    log(f"artifact {path}: {weights_bytes:,} bytes + {code:,} bytes of code = {weights_bytes + code:,} "
        f"(budget {q.artifact_budget_bytes:,}); pruned {pruned.get('pruned', 0):,} of "
        f"{pruned.get('candidates', 0):,} +-1 values")


def _frontier_artifact(fq: quant_frontier.FrontierQuantized, cfg: Config, meta: dict, path: Path, stage, log,
                       report: dict) -> None:
    """The "sdclip" scheme's quantised model in the 1.0611 record's per-group artifact
    (golf_jax.artifact_pergroup), written; nothing pruned, as the record."""
    q = cfg.quant
    code = code_size.counted_code_bytes(q.code_size_count)
    with stage("compress"):
        blob = artifact_pergroup.serialize(fq.arrays, {**meta, "scheme_meta": fq.meta}, compressor=q.group_compressor)
    with stage("write_artifact"):
        weights_bytes = atomic.write_bytes(path, blob)
    report["pruning"] = {"fits": weights_bytes + code <= q.artifact_budget_bytes, "pruned": 0}
    report["artifact"] = artifact.artifact_budget_report(weights_bytes, q.artifact_budget_bytes, code)
    report["artifact"].update(path=str(path), streams=artifact_pergroup.stream_sizes(blob),
                              group_compressor=q.group_compressor, code_size_count=q.code_size_count)
    log(f"artifact {path} (per-group, {q.group_compressor}): {weights_bytes:,} bytes + {code:,} bytes of code "
        f"({q.code_size_count}) = {weights_bytes + code:,} (budget {q.artifact_budget_bytes:,})")


def _compile_evaluation(params: Params, cfg: Config, val_tokens, lora_ttt: bool) -> tuple:
    """The evaluation's programs compiling in threads, side by side (they need the weights'
    shapes alone): the int6 round trip's, and the phased TTT's (with lora_ttt), which take
    longest (one after the other, the round trip's delayed the TTT's by ~7 s on an H200).
    Their futures (the TTT's None without)."""
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix=BACKGROUND_THREADS)
    # the reloaded weights' types: host arrays put on the default device, as checkpoint.load_model's
    shaped = jax.device_put(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params))
    round_trip = pool.submit(evaluate.compile_standard, shaped, cfg, val_tokens)
    ttt_programs = pool.submit(ttt_lora.precompile, params, cfg, val_tokens) if lora_ttt else None
    pool.shutdown(wait=False)
    return round_trip, ttt_programs


def _lora_ttt(qparams: Params, cfg: Config, val_tokens, tables, ahead: concurrent.futures.Future | None,
              rt: evaluate.EvalResult, stage, log, progress: bool) -> dict:
    """The 1.0611 record's score, the phased LoRA TTT on the artifact's weights, once its
    programs compiled beside the reload (`ahead`; None: compiled by the run)."""
    with stage("ttt"):
        wait_t0 = time.perf_counter()
        precompile_s = ahead.result() if ahead else None
        wait_s = time.perf_counter() - wait_t0
        lora = ttt_lora.run(qparams, cfg, val_tokens, tables, progress=progress, ahead=ahead is None)
    log(f"phased score-first LoRA TTT ({lora.documents} documents, global SGD phases: {lora.phases}): "
        f"val_loss {lora.loss:.4f} val_bpb {lora.bpb:.4f} ({rt.bpb - lora.bpb:+.4f} bpb against the int6 round "
        "trip)" + (f"; its programs compiled beside the reload in {precompile_s:.1f} s, {wait_s:.1f} s of it "
                   "waited for" if ahead else ""))
    # precompile_s: their compilation beside the reload and the round trip (counted in those stages'
    # compilations); precompile_wait_s: the part of it the TTT waited for
    return {**ttt_lora.summary(lora), "pre_bpb": rt.bpb, "gain_bpb": rt.bpb - lora.bpb,
            "precompile_s": precompile_s, "precompile_wait_s": wait_s if ahead else None}


def quantize_and_evaluate(params: param_tree.Params, cfg: Config, out_dir: str | Path, progress: bool = True,
                          pre_quant: dict | None = None, log=print, train_summary: dict | None = None,
                          dataset: dict | None = None, tokenizer: str | None = None) -> dict:
    """Every stage after training, timed; writes the artifact and quantize.json
    in out_dir and returns the same report. pre_quant: the standard evaluation
    of `params` when the caller already has it (train.py), else it is run.
    train_summary: train.py's summary; in budget mode the report then gives
    each stage's share of the wall-clock cap. With ttt.enabled, score-first
    test-time training runs last, on the artifact's weights. dataset: the
    identity recorded with the weights (`datasets.Dataset.record`), checked
    against the data used here and stored in the artifact; tokenizer: the
    user's --tokenizer, which overrides that check."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    compiles: dict[str, int] = {}
    beside: dict[str, int] = {}  # the evaluation's programs' (`_compile_evaluation`), while each stage ran
    report: dict = {"config": config_lib.to_dict(cfg), "backend": jax.default_backend(),
                    "device": jax.devices()[0].device_kind, "times_s": times, "compilations": compiles,
                    "compilations_beside": beside}

    stage = stage_timer(times, compiles, log, beside)

    # Inputs are checked before the long stages.
    val_tokens, tables, ds = evaluate.load_eval_data(cfg, dataset, tokenizer)
    if pre_quant is None:
        with stage("eval_pre_quant"):
            pre_quant = dataclasses.asdict(evaluate.run_standard(params, cfg, val_tokens, tables, progress))
    report["pre_quant"] = pre_quant
    log(f"pre-quantisation: val_loss {pre_quant['loss']:.4f} val_bpb {pre_quant['bpb']:.4f}")
    if cfg.model.num_loops > 0 and cfg.quant.calib_source == "self_generated":
        log(UNLOOPED_CALIBRATION)

    qmodel, quant_report = calibrate_and_quantize(params, cfg, stage, progress)
    report["quantization"] = quant_report
    if train_summary is not None and cfg.schedule.quant_in_budget:
        report["budget"] = budget_report(cfg, train_summary, times, compiles)
        log(budget_line(report["budget"]))
    fallbacks = [k for k, v in quant_report.get("matrices", {}).items() if v.get("fallback")]
    if fallbacks:
        log(f"GPTQ fell back to the per-row quantiser for {len(fallbacks)} matrices: {', '.join(fallbacks)}")

    meta = _artifact_meta(cfg, quant_report, dataset or ds.record())
    write = _frontier_artifact if isinstance(qmodel, quant_frontier.FrontierQuantized) else _artifact
    write(qmodel, cfg, meta, out_dir / ARTIFACT_NAME, stage, log, report)
    # The reload is the evaluation's first stage: the round trip's program and the phased TTT's
    # compile beside it (they need the weights' shapes alone), the TTT's beside the round trip too.
    lora_ttt = cfg.ttt.enabled and cfg.ttt.mode == "lora_phased"
    round_trip_program, ahead = _compile_evaluation(params, cfg, val_tokens, lora_ttt)
    with stage("reload"):
        qparams = checkpoint.load_model(artifact_path=out_dir / ARTIFACT_NAME).params
    with stage("eval_int6_roundtrip"):
        round_trip_program.result()
        rt = evaluate.run_standard(qparams, cfg, val_tokens, tables, progress)
    report["int6_roundtrip"] = dataclasses.asdict(rt)
    log(f"int6 round trip: val_loss {rt.loss:.4f} val_bpb {rt.bpb:.4f}")
    sl = None
    if cfg.eval.sliding_enabled:
        with stage("eval_sliding"):
            sl = evaluate.run_sliding(qparams, cfg, val_tokens, tables, progress)
        report["sliding"] = dataclasses.asdict(sl)
        log(f"int6 sliding window (stride {cfg.eval.sliding_stride}): val_loss {sl.loss:.4f} val_bpb {sl.bpb:.4f}")
    if lora_ttt:
        report["ttt"] = _lora_ttt(qparams, cfg, val_tokens, tables, ahead, rt, stage, log, progress)
    elif cfg.ttt.enabled:
        with stage("ttt"):
            result = ttt.run(qparams, cfg, val_tokens, tables, progress)
        report["ttt"] = ttt.summary(result, sl if sl is not None else rt)
        log(f"score-first TTT ({result.chunks} chunks, {result.train_steps} steps): val_loss {result.loss:.4f} "
            f"val_bpb {result.bpb:.4f} ({report['ttt']['gain_bpb']:+.4f} bpb against the sliding window)")

    out = out_dir / "quantize.json"
    checkpoint.write_json(out, report)
    log("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) + f"; wrote {out}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    from golf_jax import cli

    parser = argparse.ArgumentParser(prog="python -m golf_jax.quantize",
                                     description="Quantise a trained model into the artifact and evaluate it.")
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory, its final_model/ or its checkpoints/")
    parser.add_argument("--config", help="config file (default: the checkpoint's own config)")
    parser.add_argument("--out", help="output directory (default: the checkpoint's run directory)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the artifact and report of an earlier quantisation in the output directory")
    checkpoint.add_tokenizer_override(parser)
    parser.add_argument("--no-progress", action="store_true")
    try:
        args, overrides = cli.parse_with_overrides(parser, argv)
        loaded = checkpoint.load_model(checkpoint_path=args.checkpoint)
        cfg = cli.config_for_model(loaded.cfg, overrides, args.config)
        out_dir = Path(args.out) if args.out else run_dir_of(args.checkpoint)
        earlier = [n for n in run_dir.QUANTIZE_OUTPUTS if (out_dir / n).exists()]
        if earlier and not args.overwrite:
            raise ConfigError(f"{out_dir}: holds {earlier[0]} of an earlier quantisation; write this one elsewhere "
                              f"with --out DIR, or replace it with --overwrite")
        print(f"model: {param_tree.param_count(loaded.params):,} parameters from {loaded.source}; "
              f"backend {jax.default_backend()}")
        quantize_and_evaluate(loaded.params, cfg, out_dir, progress=not args.no_progress, dataset=loaded.dataset,
                              tokenizer=args.tokenizer)
    except checkpoint.LOAD_ERRORS as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
