"""The training loop: resume, warm-up, compilation, QAT, bad input, several devices."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import caseops, checkpoint, cli, datasets, evaluate, optim, run_dir, train, train_step, ttt_schedule
from golf_jax.config import Config, ConfigError
from golf_jax.runlog import CompileCounter
from tests.conftest import REPO, run_on_cpu_devices


# The after-training stages at their smallest; one setting for every test that
# runs them, so their compiled programs are shared (the persistent cache, conftest).
TINY_QUANT = {"quant.calib_num_seqs": "4", "quant.calib_seq_len": "32", "quant.calib_batch_size": "2"}


# configs/smoke.py shrunk: a two-layer model with every feature of the record, a few steps.
TINY = {
    "model.num_layers": "2", "model.model_dim": "64", "model.num_heads": "2", "model.num_kv_heads": "1",
    "model.bigram_dim": "32", "model.ve_dim": "16", "model.ve_layers": "1", "model.xsa_last_n": "2",
    "model.rope_dims": "8",
    "data.train_seq_len": "64", "data.train_batch_tokens": "1024", "data.micro_batches_per_step": "1",
    "schedule.iterations": "6", "schedule.warmup_steps": "0", "schedule.warmdown_iters": "4",
    "schedule.late_qat_threshold": "0.5",
    "eval.eval_seq_len": "64", "eval.val_batch_tokens": "512", "eval.max_val_tokens": "640",
    "eval.val_loss_every": "0", "eval.sliding_batch_windows": "8",
    "run.checkpoint_every": "0", "run.train_log_every": "1",
}


def tiny_config(out_dir, **overrides) -> Config:
    """TINY in `out_dir`, float32 (the CPU's compute dtype)."""
    cfg = cli.load_config_file(str(REPO / "configs/smoke.py"))
    base = {**TINY, "run.output_dir": str(out_dir), **overrides}
    return cli.apply_overrides(cfg, list(base.items())).validate()


def restore_last(cfg: Config):
    mesh = train_step.make_mesh(cfg.run.num_devices)
    tx = optim.build_optimizer(cfg.optimizer, train_step.AXIS)
    template = train_step.init_state(train.initial_params(cfg), tx, mesh, cfg.schedule.swa_enabled)
    ckpts = checkpoint.TrainCheckpoints(f"{cfg.run.output_dir}/checkpoints")
    state, meta = ckpts.restore(template)
    ckpts.close()
    return jax.device_get(state), meta


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_run_trains_and_writes_its_outputs(tmp_path):
    cfg = tiny_config(tmp_path, **{"schedule.iterations": "12", "eval.val_loss_every": "6"})
    summary = train.train(cfg, progress=False)
    # Nothing compiles after the first step: not the QAT switch, not validation.
    assert summary["steps"] == 12 and summary["recompilations_after_first_step"] == 0
    log = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    vals = [r for r in log if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [0, 6, 12]
    # Single-batch losses are noisy (the pydoc fallback corpus once ended on a
    # batch 0.3 above its neighbours): compare the mean of the last three.
    assert np.mean(losses[-3:]) < losses[0] - 0.5 and vals[-1]["loss"] < vals[0]["loss"]
    assert "late QAT on" in (tmp_path / "train.log").read_text()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["final_weights"] == "EMA" and np.isfinite(saved["final_val_bpb"])
    params, saved_cfg = checkpoint.load_params(tmp_path / "final_model")
    assert saved_cfg == cfg and params["tok_emb"].dtype == jnp.bfloat16  # reference quirk kept


def test_overwrite_replaces_a_finished_run_of_the_same_length(tmp_path):
    """--overwrite over a finished run that saved the same final step: the old
    checkpoints go, and the new run saves its own (orbax's manager, made before
    the folder was claimed, listed the old steps and refused them)."""
    cfg = tiny_config(tmp_path, **{"schedule.iterations": "2", "schedule.warmup_steps": "0"})
    train.train(cfg, progress=False)
    first = (tmp_path / "checkpoints" / "2").stat().st_mtime_ns
    summary = train.train(cfg, overwrite=True, progress=False)
    assert summary["steps"] == 2 and (tmp_path / "checkpoints" / "2").stat().st_mtime_ns != first
    assert restore_last(cfg)[1]["step"] == 2


def test_resume_is_bit_identical(tmp_path):
    straight = tiny_config(tmp_path / "a")
    train.train(straight, progress=False)
    split = tiny_config(tmp_path / "b")
    assert train.train(split, progress=False, max_steps=3) == {"step": 3, "interrupted": True}
    train.train(split, resume=True, progress=False)
    (sa, ma), (sb, mb) = restore_last(straight), restore_last(split)
    assert ma["step"] == mb["step"] == 6 and ma["cursor"] == mb["cursor"]
    assert_trees_equal(sa, sb)


def test_warmup_steps_are_undone_exactly(tmp_path, monkeypatch):
    # as on a GPU host (16 cores): the warm-up's thread pool for the slot layouts' programs,
    # of which unpacked rows have none, must still have a thread (the 1.1147 record's train.py
    # failed there: "max_workers must be greater than 0"); the other warm-up tests run CI's cores
    monkeypatch.setattr(train.os, "cpu_count", lambda: 16)
    plain = tiny_config(tmp_path / "a", **{"schedule.iterations": "3"})
    warmed = tiny_config(tmp_path / "b", **{"schedule.iterations": "3", "schedule.warmup_steps": "4"})
    train.train(plain, progress=False)
    train.train(warmed, progress=False)
    (sa, ma), (sb, mb) = restore_last(plain), restore_last(warmed)
    assert ma["cursor"] == mb["cursor"]
    assert_trees_equal(sa, sb)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, **{"optimizer.scalar_lr": "1e30", "optimizer.tied_embed_lr": "1e30",
                                   "optimizer.grad_clip_norm": "1e30", "run.checkpoint_every": "1"})
    with pytest.raises(train.TrainingError, match=r"loss is (nan|inf|-inf) at step \d+") as e:
        train.train(cfg, progress=False)
    bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
    ckpts = checkpoint.TrainCheckpoints(tmp_path / "checkpoints")
    assert ckpts.latest_step() is None or ckpts.latest_step() < bad_step
    ckpts.close()


def test_swa_option_averages_snapshots(tmp_path):
    """The final weights are the mean of the parameters after steps 2, 4 and 6 (swa_every 2,
    lr multiplier always under the threshold), each read from the checkpoint of a run stopped
    there and resumed (resuming is bit-identical, tested above)."""
    cfg = tiny_config(tmp_path, **{"schedule.swa_enabled": "true", "schedule.swa_every": "2",
                                   "schedule.swa_lr_threshold": "2.0"})
    snapshots = []
    for i in range(2):
        assert train.train(cfg, resume=i > 0, progress=False, max_steps=2)["interrupted"]
        snapshots.append(restore_last(cfg)[0].params)
    summary = train.train(cfg, resume=True, progress=False)
    snapshots.append(restore_last(cfg)[0].params)
    assert summary["final_weights"] == "SWA of 3 snapshots"
    final, _ = checkpoint.load_params(tmp_path / "final_model")
    for path, got in jax.tree_util.tree_leaves_with_path(final):
        a, b, c = (np.asarray(functools.reduce(lambda node, k: node[k.key], path, snap), np.float32)
                   for snap in snapshots)
        want = jnp.asarray((a + b + c) / np.float32(3)).astype(got.dtype)  # float32 sums, then the param's dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6)


def test_init_from_reference_weights(tmp_path):
    """--config.init_from: reference-named arrays in, the dtype rule applied."""
    from golf_jax import compat, model
    cfg = tiny_config(tmp_path)
    other = model.init_params(dataclasses.replace(cfg.model, embedding_dtype="float32"), jax.random.key(7))
    np.savez(tmp_path / "ref.npz", **compat.params_to_reference(jax.device_get(other), cfg.model))
    loaded = train.initial_params(cli.apply_overrides(cfg, [("init_from", str(tmp_path / "ref.npz"))]))
    assert loaded["tok_emb"].dtype == jnp.bfloat16 and loaded["qo_bank"].dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(other)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))  # bf16-exact values


def test_fake_quantize_int6():
    w = jnp.array([[3.0, -6.2, 0.0, 1.2], [1.0, 0.5, -0.25, 0.0], [0.31, -0.62, 0.0, 0.01]])
    q = np.asarray(train_step.fake_quantize_int6(w))
    # The third row's largest weight is under 1: the reference's floor of 1/31 sets its step.
    scale = np.array([[6.2 / 31], [1.0 / 31], [1.0 / 31]])
    np.testing.assert_allclose(q, np.clip(np.round(np.asarray(w) / scale), -32, 31) * scale, rtol=1e-6)
    assert len(np.unique(np.round(q[1] / scale[1]))) == 4
    assert q[2, 3] == 0.0 and q[2, 1] == np.float32(-19 / 31)
    # Straight-through: the gradient passes as if the rounding were the identity.
    g = jax.grad(lambda w: jnp.sum(train_step.fake_quantize_int6(w) * 3.0))(w)
    np.testing.assert_array_equal(np.asarray(g), 3.0)


def test_qat_scope_and_switch():
    params = {"bigram": {"proj": jnp.linspace(-1, 1, 12).reshape(3, 4)}, "qo_bank": jnp.linspace(-1, 1, 24).reshape(2, 3, 4),
              "tok_emb": jnp.linspace(-1, 1, 8).reshape(2, 4) * 0.37}
    off = train_step.apply_qat(params, "all", jnp.asarray(False))
    assert_trees_equal(off, params)
    small = train_step.apply_qat(params, "small", jnp.asarray(True))
    every = train_step.apply_qat(params, "all", jnp.asarray(True))
    assert not np.array_equal(small["bigram"]["proj"], params["bigram"]["proj"])
    np.testing.assert_array_equal(small["qo_bank"], params["qo_bank"])
    assert not np.array_equal(every["qo_bank"], params["qo_bank"])
    assert_trees_equal(train_step.apply_qat(params, "none", jnp.asarray(True)), params)
    np.testing.assert_array_equal(every["tok_emb"], params["tok_emb"])  # embeddings are never QAT'd


def test_configs_that_cannot_run_fail_before_compiling(tmp_path):
    cfg = tiny_config(tmp_path, **{"data.micro_batches_per_step": "8", "data.train_batch_tokens": "4096"})
    with pytest.raises(ConfigError, match="data.micro_batches_per_step: 8 is not divisible by the 3 devices"):
        train.check_runnable(cfg, 3)
    with pytest.raises(ConfigError, match="data.train_batch_tokens"):
        cli.apply_overrides(cfg, [("train_batch_tokens", "1000")]).validate()
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        cli.apply_overrides(cfg, [("num_kv_heads", "3")]).validate()
    from golf_jax import data
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=str(empty), tokenizer_path=str(
        datasets.resolve_dataset("embedded", "", "a", "b", 1024).tokenizer)))
    with pytest.raises(data.DataError, match="no shards match"):
        train.train(bad, progress=False)


def test_resume_refuses_another_model(tmp_path):
    cfg = tiny_config(tmp_path)
    train.train(cfg, progress=False, max_steps=1)
    other = cli.apply_overrides(cfg, [("model.model_dim", "128")])
    with pytest.raises(checkpoint.CheckpointError, match="model.model_dim=64"):
        train.train(other, resume=True, progress=False)


BUDGET = {"schedule.quant_in_budget": "true", "schedule.iterations": "100000", **TINY_QUANT}


def test_budget_mode_measures_its_reserve_once_and_keeps_it_on_resume(tmp_path):
    from golf_jax import quantize

    cfg = tiny_config(tmp_path, **BUDGET, **{"schedule.max_wallclock_seconds": "3", "schedule.warmup_steps": "1"})
    assert train.train(cfg, progress=False, max_steps=2)["interrupted"]
    _, meta = restore_last(cfg)
    b = meta["budget"]
    assert set(b["measured_s"]) == set(quantize.BUDGET_STAGES) and min(b["measured_s"].values()) > 0
    assert b["reserve_s"] == pytest.approx(sum(b["measured_s"].values()) * (1 + cfg.schedule.quant_reserve_margin))
    assert b["training_cap_s"] == pytest.approx(3.0 - b["reserve_s"])
    jax.clear_caches()  # as a new process: the resumed run must compile the stages itself, outside the cap
    summary = train.train(cfg, resume=True, progress=False)
    assert summary["budget"] == b  # not measured again
    assert summary["stopped_by_wallclock"]
    params, _ = checkpoint.load_params(tmp_path / "final_model")
    report = quantize.quantize_and_evaluate(params, cfg, tmp_path, progress=False, pre_quant={"loss": 0, "bpb": 0},
                                            log=lambda *_: None, train_summary=summary)
    r = report["budget"]
    # Timing the stages compiled them: after training they run without compiling.
    assert r["compilations_in_budget_stages"] == 0
    assert set(r["stages_s"]) == {"training", *quantize.BUDGET_STAGES}
    assert r["total_s"] == pytest.approx(sum(r["stages_s"].values()))
    assert r["share_of_cap"]["training"] == pytest.approx(summary["training_s"] / 3.0)


def test_budget_mode_with_a_configured_reserve_ends_training_early(tmp_path, monkeypatch):
    from golf_jax import quantize

    cfg = tiny_config(tmp_path, **BUDGET, **{"schedule.max_wallclock_seconds": "4",
                                             "schedule.quant_reserve_seconds": "2",
                                             "schedule.warmup_steps": "1"})
    # The training loop's clock advances 0.05 s per reading, whatever the machine's speed:
    # the stop is checked against the cap without a wall-clock assertion.
    clock = iter(0.05 * i for i in range(10**6))
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    summary = train.train(cfg, progress=False)
    monkeypatch.undo()
    b = summary["budget"]
    assert b["measured_s"] == {} and b["training_cap_s"] == 2.0
    # The stop looks one mean step ahead, so the step in flight ends about at the reduced cap,
    # never a whole step past it (as the reference's check-after-the-step would).
    step_s = summary["step_avg_ms"] / 1000
    assert summary["stopped_by_wallclock"] and 2.0 <= summary["training_s"] < 2.0 + step_s
    # The warmdown follows the wall clock to the reduced cap: well under way at the end.
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r for r in records if r["kind"] == "train"][-1]["lr_mult"] < 0.75
    params, _ = checkpoint.load_params(tmp_path / "final_model")
    report = quantize.quantize_and_evaluate(params, cfg, tmp_path, progress=False, pre_quant={"loss": 0, "bpb": 0},
                                            log=lambda *_: None, train_summary=summary)
    assert report["budget"]["within_cap"] and report["budget"]["reserved_s"] == 2.0
    again = tmp_path / "again"  # found in the warm-up: still the launch, so nothing is left behind
    with pytest.raises(ConfigError, match="schedule.quant_in_budget: the stages after training need 9.0 s"):
        train.train(cli.apply_overrides(cfg, [("quant_reserve_seconds", "9"), ("output_dir", str(again))]),
                    progress=False)
    assert not again.exists()


def test_main_entry_point(tmp_path, capsys):
    # TINY and budget mode's settings of the tests above, so their compiled programs are shared.
    overrides = [f"--config.{k}={v}" for k, v in {
        **TINY, **BUDGET, "schedule.iterations": "2", "schedule.warmup_steps": "1", "run.output_dir": str(tmp_path),
        # Budget mode, as the issue spells it; the cap is far off, iterations end the run.
        "schedule.max_wallclock_seconds": "600"}.items()]
    train.main(["--config", str(REPO / "configs/smoke.py"), "--no-progress", *overrides])
    out = capsys.readouterr().out
    assert "final (EMA) val_loss" in out and "budget mode:" in out and "budget 600 s: training" in out
    assert "qo_bank " in out and "blocks (module)" in out  # the parameter table at launch
    summary = json.loads((tmp_path / "summary.json").read_text())
    spent = summary["budget"]["spent"]  # train.py's summary has each stage's share after quantisation
    assert spent["within_cap"] and set(spent["share_of_cap"]) == {"training", "calibration", "hessians", "gptq"}
    assert summary["budget"]["reserve_s"] == spent["reserved_s"]


# configs/frontier_smoke.py shrunk: a narrower model on rows of 256 tokens, 6 steps, the layer
# loop on from step 3 (frac 0.5), the last step's validation only.
FRONTIER_TINY = {"model.model_dim": "32", "model.num_heads": "2", "model.num_kv_heads": "1",
                 "data.train_seq_len": "64", "data.train_batch_tokens": "512",
                 "schedule.iterations": "6", "schedule.enable_looping_at": "0.5", "schedule.warmup_steps": "1",
                 "eval.eval_seq_len": "128", "eval.val_batch_tokens": "1024", "eval.max_val_tokens": "1024",
                 "eval.document_eval_ranks": "2",  # 8 sequences: 2 ranks of one 4-sequence row
                 # no global SGD phase (tests/ttt_lora_test.py has two, against the reference): 10 s less
                 "ttt.phased_prefix_docs": "0",
                 "eval.val_loss_every": "0", "eval.sliding_stride": "64", "eval.sliding_batch_windows": "16",
                 "run.checkpoint_every": "0", "run.train_log_every": "1",
                 "data.segments_per_fold_fast": "2",  # both layouts: some steps' rows need 3 slots
                 **TINY_QUANT}


def frontier_config(out_dir, **overrides) -> Config:
    cfg = cli.load_config_file(str(REPO / "configs/frontier_smoke.py"))
    return cli.apply_overrides(cfg, list({**FRONTIER_TINY, "run.output_dir": str(out_dir), **overrides}.items()))


def train_losses(out_dir) -> list:
    records = [json.loads(line) for line in (out_dir / "train.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory):
    """python train.py --config configs/frontier_smoke.py (FRONTIER_TINY): its folder, output
    and compilations."""
    out_dir = tmp_path_factory.mktemp("frontier_smoke")
    overrides = [f"--config.{k}={v}" for k, v in {**FRONTIER_TINY, "run.output_dir": str(out_dir)}.items()]
    printed = io.StringIO()
    with CompileCounter() as compiles, contextlib.redirect_stdout(printed):
        train.main(["--config", str(REPO / "configs/frontier_smoke.py"), "--no-progress", *overrides])
    return out_dir, printed.getvalue(), compiles


def test_frontier_smoke_trains_end_to_end(frontier_run):
    """The 1.0611 record's training on packed rows, then the stages after training: the
    layer loop comes on at its fraction; two step programs, both compiled by the warm-up."""
    out_dir, out, compiles = frontier_run
    assert "warmup: 1 steps, then 1 looped" in out and "layer loop on at step 3, frac 0.500" in out
    assert "final (EMA) val_loss" in out and "int6 sliding window" not in out  # the record has none
    assert compiles.names["jit(step)"] == 4  # plain and looped, each in both slot layouts
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["layer_loop_on_at_step"] == 3
    # the fast layout's programs, compiled ahead in the warm-up, are the ones its steps call
    assert summary["recompilations_after_first_step"] == 0 and 0 < summary["packed_steps_by_slots"]["2"]
    report = json.loads((out_dir / "quantize.json").read_text())
    assert "sliding" not in report and (out_dir / run_dir.ARTIFACT_NAME).exists()
    # its score: the phased LoRA TTT on the artifact's weights, timed as a stage
    assert "phased score-first LoRA TTT" in out and np.isfinite(report["ttt"]["bpb"]) and report["times_s"]["ttt"] > 0
    assert report["ttt"]["documents"] > 0 and report["ttt"]["phases"] == 0
    # its programs compile beside the artifact's reload (shapes alone), and the TTT's calls find them
    assert report["ttt"]["precompile_s"] > 0 and "compiled beside the reload" in out
    cfg = frontier_config(out_dir)
    _, lengths = ttt_schedule.find_documents(evaluate.load_eval_data(cfg, None, None)[0], cfg.model.bos_id)
    assert compiles.names["jit(lora_chunk_step)"] == len(ttt_schedule.chunk_programs(lengths, cfg.ttt)) >= 1
    # counted beside the stages they ran beside, not as theirs: the round trip and the TTT compile nothing
    assert report["compilations"]["eval_int6_roundtrip"] == report["compilations"]["ttt"] == 0
    assert sum(report["compilations_beside"].values()) >= compiles.names["jit(lora_chunk_step)"] + 1
    # the record's quantisation: at this width only the embedding has more than 65,536 values
    assert list(report["quantization"]["matrices"]) == report["quantization"]["lqer"] == ["tok_emb.weight"]


def test_frontier_artifact_generates_text_in_its_original_case(frontier_run, capsys):
    """python -m golf_jax.generate on the run's artifact: the prompt through CaseOps after
    BOS, the looped model without a cache, the samples decoded back to the original case."""
    from golf_jax import generate

    generate.main(["--artifact", str(frontier_run[0] / run_dir.ARTIFACT_NAME), "--prompt", "The KING said",
                   "--tokens", "4", "--temperature", "0"])
    sample = capsys.readouterr().out.split("--- sample 0\n")[1]
    assert sample.startswith("The KING said") and not set(sample) & caseops.OPERATORS


def test_frontier_artifact_is_scored_with_its_programs_compiled_beside_the_reload(frontier_run, tmp_path):
    """python -m golf_jax.ttt --artifact: the phased TTT's programs compile from the artifact's
    config alone while its groups decompress, and the run compiles nothing (JAX's in-memory
    caches dropped first, so nothing is left from the pipeline's run); its score is the
    pipeline's, exactly (the same programs on the same weights)."""
    from golf_jax import ttt

    jax.clear_caches()
    ttt.main(["--artifact", str(frontier_run[0] / run_dir.ARTIFACT_NAME), "--no-progress", "--out",
              str(tmp_path / "ttt.json")])
    report = json.loads((tmp_path / "ttt.json").read_text())
    assert report["compilations"] == 0 and report["precompile_s"] > 0 and report["reload_s"] > 0
    assert report["bpb"] == json.loads((frontier_run[0] / "quantize.json").read_text())["ttt"]["bpb"]


def test_frontier_warm_up_and_resume_across_the_loop_switch(frontier_run, tmp_path):
    """Without warm-up (so the run above undid its warm-up exactly), stopped after the switch
    and resumed with an enable_looping_at that would not loop: bit for bit the run above, loss
    for loss and state for state, looped from its checkpoint's switch, the packed stream's
    cursor restored."""
    straight = frontier_config(frontier_run[0])
    split = frontier_config(tmp_path, **{"schedule.warmup_steps": "0"})
    assert train.train(split, progress=False, max_steps=4)["interrupted"]
    assert restore_last(split)[1]["looping"] == {"on": True, "at_step": 3, "at_frac": 0.5}
    train.train(cli.apply_overrides(split, [("schedule.enable_looping_at", "0.95")]), resume=True, progress=False)
    losses = [train_losses(Path(c.run.output_dir)) for c in (straight, split)]
    assert [s for s, _ in losses[0]] == list(range(1, 7)) and losses[0] == losses[1]
    (sa, ma), (sb, mb) = restore_last(straight), restore_last(split)
    assert ma["cursor"] == mb["cursor"] and ma["step"] == mb["step"] == 6
    assert_trees_equal(sa, sb)


MULTI_DEVICE = textwrap.dedent("""
    import sys, json
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from tests.train_test import tiny_config
    from golf_jax import data, data_feed, datasets, optim, train, train_step
    out = {}
    for n in (1, 2, 8):  # 4 splits as 2 and 8 do (9 s of the suite)
        cfg = tiny_config(sys.argv[2], **{"data.micro_batches_per_step": "8", "data.train_batch_tokens": "4096",
                                          "run.num_devices": str(n), "optimizer.muon_momentum_dtype": "float32",
                                          "optimizer.muon_ns_dtype": "float32", "model.embedding_dtype": "float32"})
        mesh = train_step.make_mesh(n)
        tx = optim.build_optimizer(cfg.optimizer, train_step.AXIS)
        state = train_step.init_state(train.initial_params(cfg), tx, mesh, False)
        step = train_step.make_train_step(cfg, mesh, tx, state)
        ds = datasets.resolve_dataset("embedded", "", cfg.data.train_pattern, cfg.data.val_pattern, 1024)
        batches = data.TrainBatches(ds.train_pattern, 1024, 4096, 64, world_size=n, accum_steps=8 // n)
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, train_step.AXIS))
        for _ in range(3):
            xs, ys, _, _ = data_feed.next_step_batch(batches, 8 // n, sharding)
            state, loss = step(state, xs, ys, 1.0, False, False)
        out[n] = {"loss": float(loss), "params": [np.asarray(x, np.float64).tolist() for x in jax.tree.leaves(state.params)]}
    json.dump(out, sys.stdout)
""")


def test_one_two_and_eight_devices_agree(tmp_path):
    out = run_on_cpu_devices(MULTI_DEVICE, str(tmp_path), devices=8, timeout=600)
    ref = out["1"]
    for n in ("2", "8"):
        # Same tokens, same math; only the order of the float32 sums differs
        # (per-device partial sums, then the all-reduce). Float32 throughout:
        # with bf16 embedding tables, AdamW's g / (|g| + eps) turns a rounding
        # difference in a near-zero gradient into a whole +-lr step.
        assert abs(out[n]["loss"] - ref["loss"]) < 1e-5
        for a, b in zip(out[n]["params"], ref["params"]):
            # Measured: at most 2.3e-5 after three steps.
            assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 1e-4, n
