"""The model against the PyTorch reference (float32, CPU) and its own invariants."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import compat, layers, model, param_tree
from golf_jax.config import ModelConfig

RECORD_PARAMS = 27_067_484  # the reference's count for the record config


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------- parity


def test_loss_matches_reference(tiny_params, tiny_cfg, tiny_ref):
    got = model.loss(tiny_params, tiny_cfg, jnp.asarray(tiny_ref["x"]), jnp.asarray(tiny_ref["y"]))
    assert got.dtype == jnp.float32
    assert abs(float(got) / float(tiny_ref["loss"]) - 1) <= 1e-5


def test_long_sequence_loss_uses_ntk_rope_base(tiny_params, tiny_cfg, tiny_ref):
    x, y = jnp.asarray(tiny_ref["x_long"]), jnp.asarray(tiny_ref["y_long"])
    assert x.shape[1] > tiny_cfg.rope_ntk_base_len  # the reference's NTK quirk is in play
    got = model.loss(tiny_params, tiny_cfg, x, y)
    assert abs(float(got) / float(tiny_ref["loss_long"]) - 1) <= 1e-5
    # Without the quirk the loss moves by far more than the tolerance.
    plain = dataclasses.replace(tiny_cfg, rope_ntk_base_len=10**6)
    assert abs(float(model.loss(tiny_params, plain, x, y)) / float(tiny_ref["loss_long"]) - 1) > 1e-5


def test_logits_match_reference(tiny_params, tiny_cfg, tiny_ref):
    got = model.logits(tiny_params, tiny_cfg, jnp.asarray(tiny_ref["x"]))
    assert got.shape == tiny_ref["logits"].shape and got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - tiny_ref["logits"]))) <= 1e-4


def test_every_gradient_matches_reference(tiny_params, tiny_cfg, tiny_ref):
    grads = jax.grad(model.loss)(tiny_params, tiny_cfg, jnp.asarray(tiny_ref["x"]), jnp.asarray(tiny_ref["y"]))
    ours = compat.params_to_reference(grads, tiny_cfg)
    theirs = {k.removeprefix("grad/"): v for k, v in tiny_ref.items() if k.startswith("grad/")}
    assert set(ours) == set(theirs)
    errors = {k: rel_err(ours[k], theirs[k]) for k in theirs}
    assert max(errors.values()) <= 1e-4, {k: e for k, e in errors.items() if e > 1e-4}


# ----------------------------------------------------------------------------- invariants


def test_model_is_causal(tiny_params, tiny_cfg, tiny_ref):
    """Changing later tokens never changes earlier logits (sliding eval relies on it)."""
    x = np.array(tiny_ref["x"])
    x2 = x.copy()
    x2[:, 40:] = (x2[:, 40:] + 7) % tiny_cfg.vocab_size
    a = model.logits(tiny_params, tiny_cfg, jnp.asarray(x))
    b = model.logits(tiny_params, tiny_cfg, jnp.asarray(x2))
    np.testing.assert_array_equal(np.asarray(a[:, :40]), np.asarray(b[:, :40]))
    assert not np.array_equal(np.asarray(a[:, 40:]), np.asarray(b[:, 40:]))


def test_record_param_count_and_shapes():
    cfg = ModelConfig()
    shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))
    assert param_tree.param_count(shapes) == RECORD_PARAMS
    assert shapes["qo_bank"].shape == (22, 512, 512) and shapes["kv_bank"].shape == (22, 256, 512)
    assert shapes["mlp_up_bank"].shape == (11, 1536, 512) and shapes["mlp_down_bank"].shape == (11, 512, 1536)
    table = param_tree.summary(shapes).splitlines()
    assert table[-1].split() == ["total", f"{RECORD_PARAMS:,}"]
    assert "bigram (module)" in table[4] and table[4].split()[-1] == "401,409"  # embed + proj + scale
    assert sum(int(line.split()[-1].replace(",", "")) for line in table[1:-1]
               if "(module)" not in line) == RECORD_PARAMS


def test_approach_g_variant_is_the_same_modules_with_its_shapes():
    from golf_jax import cli
    from tests.conftest import REPO
    cfg = cli.load_config_file(str(REPO / "configs/approach_g.py")).model
    shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))
    assert shapes["kv_bank"].shape == (22, 512, 512)  # 8 KV heads: full multi-head K/V
    assert shapes["mlp_up_bank"].shape == (11, 1792, 512) and shapes["bigram"]["embed"].shape == (6144, 128)
    assert shapes["ve"]["proj"].shape == (512, 128)


def test_init_follows_reference(tiny_cfg):
    cfg = tiny_cfg
    p = model.init_params(cfg, jax.random.key(314))
    L = cfg.num_layers
    # reference quirk: the three embedding tables are bf16 parameters, the rest float32.
    for path, leaf in jax.tree_util.tree_leaves_with_path(p):
        name = param_tree.path_name(path)
        want = jnp.bfloat16 if name in param_tree.EMBEDDING_KEYS else jnp.float32
        assert leaf.dtype == want, name
        as_f32 = np.asarray(leaf, np.float32)
        np.testing.assert_array_equal(as_f32, np.asarray(jnp.asarray(as_f32).astype(jnp.bfloat16), np.float32),
                                      err_msg=f"{name} is not bf16-representable")
    assert not np.any(np.asarray(p["qo_bank"][L:])) and not np.any(np.asarray(p["mlp_down_bank"]))
    assert not np.any(np.asarray(p["bigram"]["embed"]))
    for w in [p["qo_bank"][0], p["kv_bank"][3], p["kv_bank"][L + 3], p["mlp_up_bank"][2], p["bigram"]["proj"]]:
        w = np.asarray(w, np.float64)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert np.max(np.abs(gram - np.eye(len(gram)))) < 2e-2  # orthogonal up to bf16 rounding
    tok = np.asarray(p["tok_emb"], np.float32)
    assert abs(tok.std() - cfg.tied_embed_init_std) < 0.1 * cfg.tied_embed_init_std
    np.testing.assert_array_equal(np.asarray(p["blocks"]["resid_mix"][:, 0]), 1.0)
    np.testing.assert_array_equal(np.asarray(p["blocks"]["resid_mix"][:, 1]), 0.0)
    np.testing.assert_array_equal(np.asarray(p["blocks"]["q_gain"]), np.float32(np.float16(cfg.qk_gain_init)))
    assert float(p["bigram"]["scale"]) == pytest.approx(0.05, rel=1e-2)  # bf16-rounded
    assert float(p["ve"]["scale"]) == pytest.approx(0.1, rel=1e-2)
    assert not np.any(np.asarray(p["smear_gate"]))


def test_small_projections_below_64_stay_zero():
    cfg = ModelConfig(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, bigram_dim=16, ve_dim=8,
                      ve_layers="1", xsa_last_n=2, rope_dims=8)
    p = model.init_params(cfg, jax.random.key(0))
    assert not np.any(np.asarray(p["bigram"]["proj"])) and not np.any(np.asarray(p["ve"]["proj"]))


def test_projection_between_equal_widths_is_absent_as_in_the_reference():
    cfg = ModelConfig(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, bigram_dim=32, ve_dim=16,
                      ve_layers="1", xsa_last_n=2, rope_dims=8)
    p = model.init_params(cfg, jax.random.key(0))
    assert cfg.kv_dim == cfg.ve_dim and "proj" not in p["bigram"] and "proj" not in p["ve"]
    x = jnp.arange(16).reshape(2, 8)
    assert np.isfinite(float(model.loss(p, cfg, x, x)))


def test_float32_embedding_option(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, embedding_dtype="float32")
    p = model.init_params(cfg, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}


def test_features_off_and_untied_head():
    cfg = ModelConfig(num_layers=3, model_dim=64, num_heads=2, num_kv_heads=2, bigram_vocab_size=0,
                      ve_enabled=False, xsa_last_n=0, tie_embeddings=False, ln_scale=False, rope_dims=8)
    p = model.init_params(cfg, jax.random.key(0))
    assert "bigram" not in p and "ve" not in p and p["lm_head"].shape == (1024, 64)
    x = jnp.arange(32).reshape(2, 16)
    loss = model.loss(p, cfg, x, x)
    # The untied head is zero at init: uniform logits, loss = ln(vocab).
    assert float(loss) == pytest.approx(np.log(1024), rel=1e-6)


@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_mlp_activation_is_leaky_relu_squared_with_the_configured_slope(slope):
    """With attention and the embedding mix switched off, a block is
    x + mlp_scale * down(act(up(rms_norm(x) * ln_scale)))): checked by hand
    for the record's 0.5 and ReLU^2 (0, PR #1234)."""
    cfg = ModelConfig(num_layers=2, model_dim=64, num_heads=2, num_kv_heads=2, mlp_mult=3.5, rope_dims=8,
                      xsa_last_n=2, ve_layers="1", mlp_negative_slope=slope, compute_dtype="float32", attention_impl="jnp")
    p = model.init_params(cfg, jax.random.key(0))
    p["mlp_down_bank"] = jax.random.normal(jax.random.key(1), p["mlp_down_bank"].shape) * 0.05
    p["blocks"]["attn_scale"] = jnp.zeros_like(p["blocks"]["attn_scale"])
    p["blocks"]["resid_mix"] = p["blocks"]["resid_mix"].at[:, 1].set(0.0).at[:, 0].set(1.0)
    x = jax.random.normal(jax.random.key(2), (2, 8, 64))
    rope = layers.rotary_tables(cfg, jnp.arange(8), cfg.rope_base)
    layer = 1
    weights = model.GPT(cfg).apply({"params": p}, layer, jnp.float32, method=model.GPT.layer_weights)
    got = model.Block(cfg, layer).apply({}, x, jnp.zeros_like(x), weights, None, rope)
    h = layers.rms_norm(x) * (layer + 1) ** -0.5
    pre = h @ p["mlp_up_bank"][layer].T
    act = np.where(pre > 0, pre, slope * pre) ** 2
    want = x + p["blocks"]["mlp_scale"][layer] * (act @ p["mlp_down_bank"][layer].T)
    assert cfg.mlp_dim == 224
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)  # float32 matmul order


def test_bfloat16_compute_close_to_float32(tiny_params, tiny_cfg, tiny_ref):
    x, y = jnp.asarray(tiny_ref["x"]), jnp.asarray(tiny_ref["y"])
    bf16 = dataclasses.replace(tiny_cfg, compute_dtype="bfloat16")
    got = model.loss(param_tree.cast_params(tiny_params, bf16), bf16, x, y)
    assert got.dtype == jnp.float32
    # bf16 has 8 mantissa bits (~4e-3 relative per op); 11 layers compound it.
    assert abs(float(got) / float(tiny_ref["loss"]) - 1) < 2e-2


@pytest.mark.full_optimization
def test_bf16_head_rounds_logits_and_scales_norms_in_float32(tiny_params, tiny_cfg):
    bf16 = dataclasses.replace(tiny_cfg, compute_dtype="bfloat16")
    params = param_tree.cast_params(tiny_params, bf16)
    h = jax.random.normal(jax.random.key(0), (2, 5, bf16.model_dim)).astype(jnp.bfloat16)
    # reference quirk: autocast's head matmul returns bf16, then the softcap runs in float32.
    z = jnp.einsum("btd,vd->btv", h, params["tok_emb"].astype(jnp.bfloat16)).astype(jnp.float32)
    want = bf16.logit_softcap * jnp.tanh(z / bf16.logit_softcap)
    np.testing.assert_array_equal(model.logits_from_hidden(params, bf16, h), want)
    unrounded = model.logits_from_hidden(params, dataclasses.replace(bf16, round_logits=False), h)
    assert not np.array_equal(unrounded, want)
    # The LN scale multiplies in float32 (a Python float times bf16 would round 1/sqrt(3) to 0.578125).
    x = jax.random.normal(jax.random.key(1), (4, 64)).astype(jnp.bfloat16)
    xf = x.astype(jnp.float32)
    exact = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + layers.RMS_NORM_EPS) * 3 ** -0.5
    np.testing.assert_array_equal(layers.rms_norm(x, 3 ** -0.5), exact.astype(jnp.bfloat16))


@pytest.mark.full_optimization
def test_bf16_logits_rounding_survives_jit():
    """round_logits: the pre-softcap logits of the jitted model are bf16 values. XLA:CPU
    turned the head's bf16 matmul and the convert after it into one float32 matmul at
    these sizes (record width, 8192 tokens), dropping the rounding (docs/fidelity.md,
    "the first-step gap, part 2"); the head now rounds the float32 product explicitly."""
    cfg = ModelConfig(vocab_size=1024, num_layers=1, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=3.0,
                      compute_dtype="bfloat16", embedding_dtype="bfloat16", round_logits=True, attention_impl="jnp",
                      mlp_impl="jnp", bigram_vocab_size=0, ve_enabled=False, xsa_last_n=0)
    params = model.init_params(cfg, jax.random.key(0))
    params["tok_emb"] = (0.05 * jax.random.normal(jax.random.key(1), params["tok_emb"].shape)).astype(jnp.bfloat16)
    tokens = jax.random.randint(jax.random.key(2), (4, 2048), 0, cfg.vocab_size)
    logits = np.asarray(model.logits(params, cfg, tokens), np.float64)
    z = cfg.logit_softcap * np.arctanh(logits / cfg.logit_softcap)  # back to the matmul's output, to ~1e-6
    on_grid = np.abs(z - np.asarray(jnp.asarray(z, jnp.float32).astype(jnp.bfloat16), np.float64)) < 1e-4
    assert on_grid.mean() > 0.999, on_grid.mean()
