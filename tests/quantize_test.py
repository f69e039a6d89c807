"""The after-training pipeline end to end: checkpoint -> calibration ->
Hessians -> GPTQ -> pruning -> artifact -> evaluations, and its replay."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from golf_jax import artifact, checkpoint, evaluate, generate, quant, quantize, train, ttt
from tests.train_test import TINY_QUANT, tiny_config



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained a few steps, as train.py leaves it."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out, **TINY_QUANT, **{"run.checkpoint_every": "3"})
    train.train(cfg, progress=False)
    return out, cfg


def test_replay_writes_identical_artifacts_within_budget(trained, tmp_path):
    run, cfg = trained
    params, saved = checkpoint.load_params(run / "final_model")
    reports = [quantize.quantize_and_evaluate(params, saved, tmp_path / name, progress=False, log=lambda *_: None)
               for name in ("a", "b")]
    a, b = (tmp_path / n / quantize.ARTIFACT_NAME for n in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    r = reports[0]
    assert r["artifact"]["fits"] and r["artifact"]["total_bytes"] == a.stat().st_size + artifact.code_bytes()
    assert r["pruning"]["pruned"] == 0  # the default 16 MB budget is far above this model
    for key in ("pre_quant", "int6_roundtrip", "sliding"):
        assert np.isfinite(r[key]["bpb"]) and r[key]["bpb"] > 0
    # int6 costs a little on a model this small; it must not wreck it.
    assert abs(r["int6_roundtrip"]["bpb"] - r["pre_quant"]["bpb"]) < 0.05 * r["pre_quant"]["bpb"]
    assert set(r["times_s"]) >= {"calibration", "hessians", "gptq", "compress_and_prune", "write_artifact", "eval_sliding"}
    assert json.loads((tmp_path / "a" / "quantize.json").read_text())["artifact"]["fits"]


def test_artifact_holds_what_the_rules_say(trained, tmp_path):
    run, cfg = trained
    params, saved = checkpoint.load_params(run / "final_model")
    record = checkpoint.read_dataset_record(run / "final_model")
    quantize.quantize_and_evaluate(params, saved, tmp_path, progress=False, log=lambda *_: None, dataset=record)
    qmodel, meta = artifact.read_artifact(tmp_path / quantize.ARTIFACT_NAME)
    assert meta["config"]["model"] == json.loads((run / "final_model" / "config.json").read_text())["model"]
    # The tokenizer travels with the model: train.py's record, sha256 and all.
    assert meta["data"] == record and record["tokenizer"]["vocab_size"] == cfg.model.vocab_size
    for bank in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"):
        t = qmodel[bank]
        assert t.kind == quant.INT6 and np.abs(t.data).max() <= cfg.quant.clip_range
        assert t.scale.dtype == np.float16 and t.scale.shape == t.data.shape[:-1]
    assert qmodel["blocks/attn_scale"].kind == quant.FP16
    loaded, lcfg, _, _ = checkpoint.load_model(artifact_path=tmp_path / quantize.ARTIFACT_NAME)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert x.shape == y.shape and x.dtype == y.dtype


def test_pruning_meets_a_tight_budget(trained, tmp_path):
    run, cfg = trained
    params, saved = checkpoint.load_params(run / "final_model")
    unpruned = quantize.quantize_and_evaluate(params, saved, tmp_path / "free", progress=False,
                                              pre_quant={"loss": 0.0, "bpb": 0.0}, log=lambda *_: None)
    # A budget 2 KB under the unpruned size: some +-1 values must go.
    budget = unpruned["artifact"]["total_bytes"] - 2000
    tight = dataclasses.replace(saved, quant=dataclasses.replace(saved.quant, artifact_budget_bytes=budget))
    r = quantize.quantize_and_evaluate(params, tight, tmp_path / "tight", progress=False,
                                       pre_quant={"loss": 0.0, "bpb": 0.0}, log=lambda *_: None)
    p = r["pruning"]
    assert r["artifact"]["fits"] and r["artifact"]["total_bytes"] <= budget
    assert 0 < p["pruned"] < p["candidates"]
    # Exactly the values the search chose are zero now, found in a binary search.
    qmodel, _ = artifact.read_artifact(tmp_path / "tight" / quantize.ARTIFACT_NAME)
    free, _ = artifact.read_artifact(tmp_path / "free" / quantize.ARTIFACT_NAME)
    zeroed = sum(int(np.sum((free[k].data != 0) & (qmodel[k].data == 0))) for k in free if free[k].kind == quant.INT6)
    assert zeroed == p["pruned"]
    assert p["size_evaluations"] <= 3 + math.ceil(math.log2(p["candidates"]))


def test_replay_from_training_checkpoint_dir(trained):
    run, cfg = trained
    from_ckpt, ccfg, source, _ = checkpoint.load_model(checkpoint_path=run / "checkpoints")
    final = checkpoint.load_model(checkpoint_path=run).params
    assert "checkpoint" in source and ccfg.model == cfg.model
    # The last checkpoint is the final step's state; its EMA is what final_model holds.
    for x, y in zip(jax.tree.leaves(from_ckpt), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cli_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        quantize.main(["--checkpoint", str(tmp_path / "nope")])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.golf"
    bad.write_bytes(b"not an artifact at all")
    with pytest.raises(SystemExit):
        generate.main(["--artifact", str(bad)])
    assert "bad.golf" in capsys.readouterr().err


def test_quantize_and_generate_command_lines(trained, tmp_path, capsys):
    run, _ = trained
    small_ttt = ["--config.ttt.chunk_tokens=256", "--config.ttt.seq_len=64", "--config.ttt.batch_seqs=2"]
    quantize.main(["--checkpoint", str(run), "--out", str(tmp_path), "--no-progress",
                   "--config.quant.calib_num_seqs=2", "--config.ttt.enabled=true", *small_ttt])
    out = capsys.readouterr().out
    for words in ("pre-quantisation: val_loss", "int6 round trip", "sliding window", "stage times", "bytes of code",
                  "score-first TTT (3 chunks"):
        assert words in out
    report = json.loads((tmp_path / "quantize.json").read_text())
    assert report["config"]["quant"]["calib_num_seqs"] == 2  # the override reached the pipeline
    # TTT runs on the artifact's weights: its baseline is the int6 sliding score.
    t = report["ttt"]
    assert t["pre_bpb"] == report["sliding"]["bpb"] and t["train_steps"] > 0 and np.isfinite(t["post_bpb"])
    assert t["gain_bpb"] == pytest.approx(t["pre_bpb"] - t["post_bpb"])
    ttt.main(["--artifact", str(tmp_path / quantize.ARTIFACT_NAME), "--no-progress", "--out",
              str(tmp_path / "ttt.json"), *small_ttt])
    assert "post-TTT: val_loss" in capsys.readouterr().out
    again = json.loads((tmp_path / "ttt.json").read_text())
    assert again["post_bpb"] == t["post_bpb"] and again["pre_bpb"] == t["pre_bpb"]  # the same run, replayed
    generate.main(["--artifact", str(tmp_path / quantize.ARTIFACT_NAME), "--prompt", "The king", "--tokens", "6",
                   "--samples", "2", "--temperature", "0"])
    out = capsys.readouterr().out
    assert "--- sample 1" in out and out.count("The king") == 2
    # evaluate takes the trained model too; its numbers go only where --out says.
    evaluate.main(["--artifact", str(tmp_path / quantize.ARTIFACT_NAME), "--no-progress",
                   "--out", str(tmp_path / "eval_artifact.json")])
    assert "sliding: loss" in capsys.readouterr().out
    scores = json.loads((tmp_path / "eval_artifact.json").read_text())
    assert scores["sliding"]["bpb"] == pytest.approx(report["sliding"]["bpb"], rel=1e-6)  # the same weights
    assert not (run / "eval.json").exists()
    # A replay into a folder with an artifact: refused, the ways on named, nothing written.
    before = (tmp_path / quantize.ARTIFACT_NAME).read_bytes()
    with pytest.raises(SystemExit) as e:
        quantize.main(["--checkpoint", str(run), "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--overwrite" in err and "--out DIR" in err and err.count("\n") == 1
    assert (tmp_path / quantize.ARTIFACT_NAME).read_bytes() == before
