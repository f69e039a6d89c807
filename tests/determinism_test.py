"""Determinism: the same seed and config give bit-identical parameters and
byte-identical artifacts; another seed gives different ones (CPU)."""

from __future__ import annotations

import jax
import numpy as np

from golf_jax import checkpoint, generate, quantize, train
from tests.train_test import TINY_QUANT, tiny_config



def run(out_dir, seed: int):
    cfg = tiny_config(out_dir, **TINY_QUANT, **{"run.seed": str(seed), "schedule.iterations": "4"})
    train.train(cfg, progress=False)
    params, saved = checkpoint.load_params(out_dir / "final_model")
    quantize.quantize_and_evaluate(params, saved, out_dir, progress=False, pre_quant={"loss": 0.0, "bpb": 0.0},
                                   log=lambda *_: None)
    return params, (out_dir / quantize.ARTIFACT_NAME).read_bytes()


def test_same_seed_same_bits_other_seed_other_bits(tmp_path):
    params_a, artifact_a = run(tmp_path / "a", seed=11)
    params_b, artifact_b = run(tmp_path / "b", seed=11)
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert artifact_a == artifact_b
    # Another seed: another initialisation and another calibration set, the
    # two things the seed reaches, so every weight matrix and the artifact differ.
    cfg_a, cfg_c = (tiny_config(tmp_path / "c", **TINY_QUANT, **{"run.seed": str(seed)}) for seed in (11, 12))
    init_a, init_c = train.initial_params(cfg_a), train.initial_params(cfg_c)
    for name in ("qo_bank", "kv_bank", "mlp_up_bank", "tok_emb"):
        assert not np.array_equal(np.asarray(init_a[name]), np.asarray(init_c[name])), name
    calib_a, calib_c = (generate.calibration_tokens(params_a, cfg) for cfg in (cfg_a, cfg_c))
    assert not np.array_equal(calib_a, calib_c)
