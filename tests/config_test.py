"""Config dataclasses, config files and --config.<field>=<value> overrides."""

from __future__ import annotations

import argparse
import dataclasses
import os
import json

import pytest

from golf_jax import cli, config
from golf_jax.config import Config, ConfigError, ModelConfig
from tests.conftest import REPO, fixture_path


def test_model_config_takes_the_reference_json():
    cfg = ModelConfig(**json.loads(fixture_path("model_tiny_config.json").read_text()))
    assert (cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.ve_layer_indices) == (128, 4, 2, (9, 10))
    assert cfg.head_dim == 32 and cfg.kv_dim == 64 and cfg.mlp_dim == 384 and cfg.num_skip_weights == 5


def test_record_config_is_the_appendix():
    cfg = cli.load_config_file(str(REPO / "configs/record.py")).validate()
    m, o, s, q, e = cfg.model, cfg.optimizer, cfg.schedule, cfg.quant, cfg.eval
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_dim) == (11, 512, 8, 4, 1536)
    assert (m.bigram_vocab_size, m.bigram_dim, m.xsa_last_n, m.rope_dims, m.ve_layers) == (3072, 112, 11, 16, "9,10")
    assert (cfg.data.train_seq_len, cfg.data.train_batch_tokens, e.eval_seq_len) == (2048, 786_432, 2048)
    assert (o.matrix_lr, o.muon_momentum, o.muon_momentum_warmup_start, o.tied_embed_lr) == (0.025, 0.99, 0.92, 0.035)
    assert (s.warmdown_iters, s.max_wallclock_seconds, s.ema_decay, s.late_qat_threshold) == (4000, 600.0, 0.997, 0.15)
    assert (q.clip_range, q.calib_num_seqs, q.calib_temperature, e.sliding_stride) == (31, 64, 0.8, 64)
    assert (q.scheme, q.calib_source) == ("percentile", "self_generated")
    assert cfg.run.seed == 314
    assert (o.muon_ns_coefficients, o.muon_ns_rounding, o.muon_row_normalize, s.warmdown_frac) == ("quintic", "eager",
                                                                                                False, 0.0)


def test_approach_g_config_is_pr_1234_as_described():
    cfg = cli.load_config_file(str(REPO / "configs/approach_g.py")).validate()
    m, q, s, t = cfg.model, cfg.quant, cfg.schedule, cfg.ttt
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_dim) == (11, 512, 8, 8, 1792)
    assert m.mlp_negative_slope == 0.0 and (m.bigram_vocab_size, m.bigram_dim) == (6144, 128)
    assert m.ve_layer_indices and m.xsa_last_n == 11
    assert (q.calib_num_seqs, q.calib_seq_len, q.calib_temperature) == (64, 2048, 0.8)
    assert s.quant_in_budget and s.max_wallclock_seconds == 600.0
    assert t.enabled and (t.chunk_tokens, t.optimizer, t.lr, t.momentum, t.epochs, t.batch_seqs, t.grad_clip_norm,
                          t.freeze_blocks) == (32_768, "sgd", 0.002, 0.9, 3, 32, 1.0, 0)
    # What the PR does not state is the record's.
    record = cli.load_config_file(str(REPO / "configs/record.py"))
    assert cfg.optimizer == record.optimizer and cfg.data == record.data


def test_frontier_config_is_the_records_run():
    """configs/frontier.py: the 1.0611 record's settings with its environment overrides
    (SPEC.md sections 1-3, train_seed42.log), and its 35,945,671 parameters (shapes only)."""
    import jax

    from golf_jax import model, param_tree

    cfg = cli.load_config_file(str(REPO / "configs/frontier.py")).validate()
    m, d, o, s, e = cfg.model, cfg.data, cfg.optimizer, cfg.schedule, cfg.eval
    shapes = jax.eval_shape(lambda k: model.init_params(m, k), jax.random.key(0))
    assert param_tree.param_count(shapes) == 35_945_671
    assert m.layer_order(looping=True) == ((0, 1, 2, 3, 4, 5, 3, 4), (5, 3, 4, 5, 6, 7, 8, 9, 10))
    assert (m.vocab_size, m.mlp_mult, m.qk_gain_init, m.rope_ntk_base_len, m.sparse_attn_gate_scale) == (
        8192, 4.0, 5.0, 0, 0.5)
    assert (d.text_transform, d.packed_documents, d.train_batch_tokens // d.micro_batches_per_step) == (
        "caseops", True, 98_304)
    assert (o.matrix_lr, o.tied_embed_lr, o.scalar_lr, o.beta1, o.beta2, o.grad_clip_norm) == (
        0.026, 0.03, 0.02, 0.9, 0.99, 0.3)
    assert (o.muon_momentum_warmup_start, o.muon_momentum, o.muon_momentum_warmup_steps) == (0.92, 0.97, 1500)
    assert (o.muon_weight_decay, o.embed_weight_decay, o.adam_weight_decay) == (0.095, 0.085, 0.02)
    assert (o.muon_ns_coefficients, o.muon_row_normalize, o.muon_momentum_warmup_exact) == ("polar_express", True,
                                                                                             True)
    assert (s.warmdown_frac, s.min_lr_mult, s.max_wallclock_seconds, s.gptq_reserve_seconds) == (0.85, 0.1, 600, 0.5)
    assert (s.enable_looping_at, s.ema_decay, s.warmup_steps, s.swa_enabled, s.late_qat_threshold) == (
        0.35, 0.9965, 20, False, 0.0)
    # its score: the phased LoRA TTT, no sliding window
    assert (e.val_loss_every, cfg.run.seed, cfg.ttt.enabled, cfg.ttt.mode, e.sliding_enabled) == (
        0, 42, True, "lora_phased", False)
    q = cfg.quant  # SPEC.md section 4 and the README's command
    assert (q.scheme, q.calib_source, q.calib_num_seqs // q.calib_batch_size, q.calib_batch_size, q.calib_seq_len) == (
        "sdclip", "train_shards", 16, 48, 2048)
    assert (q.attn_clip_sigmas, q.mlp_clip_sigmas, q.embed_clip_sigmas, q.clip_range, q.embed_clip_range) == (
        13.0, 11.5, 14.0, 31, 63)
    assert (q.gate_int8, q.keep_float_max_numel, q.lqer_top_k, q.lqer_rank, q.lqer_asym_group) == (
        True, 65_536, 3, 4, 64)
    smoke = cli.load_config_file(str(REPO / "configs/frontier_smoke.py")).validate()
    assert smoke.data.data_dir == "embedded" and smoke.data.packed_documents and smoke.model.num_loops == 2
    assert smoke.optimizer == cfg.optimizer
    # its validation text gives each rank of the document-masked evaluation a whole batch
    # (with the record's 8 ranks it did not: train.py stopped before training)
    from golf_jax import evaluate
    tokens, _, _ = evaluate.load_eval_data(smoke)
    starts, _ = evaluate.configured_document_rows(smoke, len(tokens))
    assert len(starts) >= smoke.eval.document_eval_ranks


@pytest.mark.parametrize("changes, message", [
    ({"gptq_reserve_seconds": -1.0}, "schedule.gptq_reserve_seconds"),
    ({"gptq_reserve_seconds": 600.0}, "schedule.gptq_reserve_seconds: must be >= 0 and below"),
    ({"gptq_reserve_seconds": 0.5, "quant_in_budget": True}, "budget mode"),
    ({"enable_looping_at": -0.1}, "schedule.enable_looping_at"),
])
def test_frontier_schedule_checks_name_the_field(changes, message):
    import dataclasses
    cfg = Config()
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, **changes)).validate()


def test_budget_mode_needs_a_cap():
    import dataclasses
    cfg = Config()
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, quant_in_budget=True,
                                                                 max_wallclock_seconds=0.0))
    with pytest.raises(ConfigError, match="schedule.quant_in_budget"):
        cfg.validate()
    assert cli.apply_overrides(Config(), [("quant_in_budget", "True")]).schedule.quant_in_budget  # the spelling


def test_smoke_config_is_small_and_valid():
    cfg = cli.load_config_file(str(REPO / "configs/smoke.py")).validate()
    assert cfg.model.num_layers <= 4 and cfg.data.data_dir == "embedded"


def test_overrides_dotted_bare_and_typed():
    cfg = Config()
    out = cli.apply_overrides(cfg, [("model.num_layers", "4"), ("sliding_stride", "32"),
                                    ("ln_scale", "false"), ("matrix_lr", "0.01"), ("output_dir", "x/y"),
                                    ("train_batch_tokens", "1_048_576")])
    assert out.model.num_layers == 4 and out.eval.sliding_stride == 32 and out.model.ln_scale is False
    assert out.optimizer.matrix_lr == 0.01 and out.run.output_dir == "x/y"
    assert out.data.train_batch_tokens == 1_048_576
    assert cfg.model.num_layers == 11  # frozen: the original is untouched


@pytest.mark.parametrize("override, message", [
    (("model.num_layerz", "4"), "section 'model' has no field 'num_layerz'"),
    (("nonsense", "1"), "--config.nonsense: unknown config field"),
    (("model.num_layers", "four"), "'four' is not a valid int"),
    (("ln_scale", "maybe"), "'maybe' is not a valid bool"),
    (("matrix_lr", "fast"), "'fast' is not a valid float"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        cli.apply_overrides(Config(), [override])


def test_split_overrides_both_spellings():
    overrides, rest = cli.split_overrides(["--config", "c.py", "--config.a.b=1", "--config.c", "2", "--x"])
    assert overrides == [("a.b", "1"), ("c", "2")] and rest == ["--config", "c.py", "--x"]


@pytest.mark.parametrize("changes, field", [
    ({"num_heads": 6}, "model.num_heads"),
    ({"num_kv_heads": 3}, "model.num_kv_heads"),
    ({"rope_dims": 7}, "model.rope_dims"),
    ({"ve_layers": "9,11"}, "model.ve_layers"),
    ({"ve_layers": "a,b"}, "model.ve_layers"),
    ({"compute_dtype": "float16"}, "model.compute_dtype"),
    ({"num_loops": 2, "loop_start": 5, "loop_end": 3}, "model.loop_start"),
    ({"num_loops": 2, "loop_start": 3, "loop_end": 11}, "model.loop_start"),
    ({"num_loops": -1}, "model.num_loops"),
    ({"parallel_start_layer": 12}, "model.parallel_start_layer"),
    ({"parallel_final_lane": "sum"}, "model.parallel_final_lane"),
    ({"smear_gate": "dynamic"}, "model.smear_gate"),
    ({"sparse_attn_gate": True, "gate_window": 513}, "model.gate_window"),
    ({"smear_gate": "windowed", "bos_id": 1024}, "model.bos_id"),
    ({"rope_ntk_base_len": -1}, "model.rope_ntk_base_len"),
])
def test_validation_names_the_field(changes, field):
    import dataclasses
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(Config(), model=dataclasses.replace(ModelConfig(), **changes)).validate()


def test_indivisible_batch_names_the_field():
    cfg = cli.apply_overrides(Config(), [("train_batch_tokens", "1000")])
    with pytest.raises(ConfigError, match="data.train_batch_tokens"):
        cfg.validate()


def test_unknown_text_transform_names_the_field():
    assert cli.apply_overrides(Config(), [("text_transform", "caseops")]).validate().data.text_transform == "caseops"
    with pytest.raises(ConfigError, match=r"data.text_transform: '' \(none\) or 'caseops', got 'CaseOps'"):
        cli.apply_overrides(Config(), [("text_transform", "CaseOps")]).validate()


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        cli.load_config_file(tmp_path / "none.py")
    bad = tmp_path / "bad.py"
    bad.write_text("from golf_jax.config import Config, ModelConfig\n"
                   "def get_config():\n    return Config(model=ModelConfig(num_layerz=3))\n")
    with pytest.raises(ConfigError, match=r"bad.py: .*num_layerz"):
        cli.load_config_file(bad)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        cli.load_config_file(empty)


def test_parse_exits_with_a_one_line_message(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(argparse.ArgumentParser(prog="prog"), ["--config", str(REPO / "configs/smoke.py"), "--config.num_heads=3"])
    assert e.value.code == 2
    assert "config error: model.num_heads" in capsys.readouterr().err


def test_dict_round_trip():
    cfg = cli.load_config_file(str(REPO / "configs/record.py"))
    assert config.from_dict(config.to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        config.from_dict({"model": {"bogus": 1}})


def test_help_shows_the_override_syntax(capsys):
    with pytest.raises(SystemExit):
        cli.parse(argparse.ArgumentParser(prog="x"), ["--help"])
    assert "--config.<section>.<field>=<value>" in capsys.readouterr().out


def test_commands_quiet_library_warnings_but_not_errors():
    """orbax's absl warnings (deprecations and the like) stay out of a command's output."""
    import logging

    from absl import logging as absl_logging

    before = absl_logging.get_verbosity()
    try:
        cli.parse_with_overrides(argparse.ArgumentParser(prog="x"), [])
        absl = logging.getLogger("absl")
        assert not absl.isEnabledFor(logging.WARNING) and absl.isEnabledFor(logging.ERROR)
    finally:
        absl_logging.set_verbosity(before)


def test_config_for_a_trained_model_keeps_its_model_section():
    saved = cli.load_config_file(str(REPO / "configs/smoke.py"))
    cfg = cli.config_for_model(saved, [("eval.sliding_stride", "32")])
    assert cfg.model == saved.model and cfg.eval.sliding_stride == 32
    with pytest.raises(ConfigError, match="--config.model.num_layers: the model section comes with the model"):
        cli.config_for_model(saved, [("num_layers", "2")])
    with pytest.raises(ConfigError, match="record.py: its model section differs from the model's"):
        cli.config_for_model(saved, [], str(REPO / "configs/record.py"))


@pytest.mark.parametrize("field,value", [("artifact_format", "zip"), ("group_compressor", "zstd"),
                                         ("code_size_count", "gzip"), ("artifact_format", "pergroup")])
def test_quant_artifact_choices_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"quant.{field}"):
        Config(quant=config.QuantConfig(**{field: value})).validate()


def test_missing_tools_of_the_stages_after_training_are_named(monkeypatch):
    """quant.missing_tools (train.py asks before training, unless --no-quantize): each tool the
    artifact and code count need, named with its install command; a config stays loadable."""
    import importlib.util
    import shutil

    q = config.QuantConfig(scheme="sdclip", artifact_format="pergroup", group_compressor="lrzip",
                           code_size_count="minified_brotli")
    Config(quant=q).validate()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "python_minifier and brotli" in q.missing_tools()
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "apt-get install lrzip" in q.missing_tools()
    assert config.QuantConfig().missing_tools() is None  # the 1.1147 record's lzma artifact needs nothing
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "zpaq" else real_find_spec(name))
    assert "pip install zpaq" in dataclasses.replace(q, group_compressor="zpaq", code_size_count="raw").missing_tools()


def test_an_lrzip_that_cannot_start_is_named_before_training(monkeypatch, tmp_path):
    """An lrzip on PATH whose shared library is missing (as a .deb unpacked aside from /) fails
    quant.missing_tools with its own message, not the compress stage after training."""
    fake = tmp_path / "lrzip"
    fake.write_text("#!/bin/sh\necho 'lrzip: error while loading shared libraries: liblzo2.so.2' >&2\nexit 127\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    q = config.QuantConfig(scheme="sdclip", artifact_format="pergroup", group_compressor="lrzip", code_size_count="raw")
    problem = q.missing_tools()
    assert "exits 127" in problem and "liblzo2.so.2" in problem and "apt-get install lrzip" in problem


@pytest.mark.parametrize("fast", ["1", "32", "40", "8,40", "8,8", "eight"])
def test_fast_slots_must_be_fewer_than_the_capacity(fast):
    import dataclasses
    cfg = Config()
    with pytest.raises(ConfigError, match="data.segments_per_fold_fast"):
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, segments_per_fold_fast=fast)).validate()
