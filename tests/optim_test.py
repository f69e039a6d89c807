"""Muon against the reference, the optimizer's routing and hyperparameters, and the schedules."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from golf_jax import model, optim, param_tree
from golf_jax.config import ModelConfig, OptimizerConfig, ScheduleConfig
from tests.conftest import fixture_path

BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")


@pytest.fixture(scope="module")
def muon_ref():
    with np.load(fixture_path("muon.npz")) as z:
        return {k: z[k] for k in z.files}


def relative_to_step(got, ref, prev) -> float:
    """||p - ref|| / ||ref - previous ref||: the error as a fraction of the step."""
    return float(np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref - prev))


@pytest.mark.parametrize("dtype, suffix, tol", [
    (jnp.float32, "_fp32", 1e-4),  # a float32 port lands near 3e-6
    # The bf16 Newton-Schulz alone is bit-exact (next test), but the fixture's
    # two steps are not reproduced bit for bit from its float32 gradients
    # (measured 2.5-5.0% of the step; before the reference's rounding order
    # was followed, 7-13%): the iteration amplifies one bf16 rounding apart.
    (jnp.bfloat16, "", 0.06),
])
def test_muon_two_steps_match_reference(muon_ref, dtype, suffix, tol):
    tx = optim.muon(0.025, 0.95, nesterov=True, ns_steps=5, weight_decay=0.04, momentum_dtype=dtype, ns_dtype=dtype)
    params = {b: jnp.asarray(muon_ref[f"init/{b}"]) for b in BANKS}
    state = tx.init(params)
    prev = {b: muon_ref[f"init/{b}"] for b in BANKS}
    for k in range(2):
        grads = {b: jnp.asarray(muon_ref[f"grad{k}/{b}"]) for b in BANKS}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for b in BANKS:
            ref = muon_ref[f"after{k}{suffix}/{b}"]
            assert params[b].dtype == jnp.float32
            assert relative_to_step(params[b], ref, prev[b]) <= tol, (k, b)
        prev = {b: muon_ref[f"after{k}{suffix}/{b}"] for b in BANKS}


# float32: a float32 port lands near 1e-6. bf16: every bf16 rounding of the
# reference's eager PyTorch reproduced, so exact (on the CPU; cuBLAS may sum
# the float32 accumulators in another order).
@pytest.mark.parametrize("dtype, key, tol", [(jnp.float32, "ns_out_fp32", 1e-5), (jnp.bfloat16, "ns_out_bf16", 0.0)])
def test_newton_schulz_matches_reference(muon_ref, dtype, key, tol):
    got = np.asarray(jax.jit(optim.newton_schulz, static_argnums=(1, 2))(jnp.asarray(muon_ref["ns_in"]), 5, dtype),
                     np.float64)
    ref = muon_ref[key]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= tol


def test_newton_schulz_orthogonalises_tall_and_wide():
    g = jax.random.normal(jax.random.key(0), (2, 96, 32))
    for x in (g, jnp.swapaxes(g, -1, -2)):
        o = np.asarray(optim.newton_schulz(x, 5, jnp.float32), np.float64)
        small = o.shape[-1] if o.shape[-2] > o.shape[-1] else o.shape[-2]
        gram = np.swapaxes(o, -1, -2) @ o if o.shape[-2] > o.shape[-1] else o @ np.swapaxes(o, -1, -2)
        sv = np.linalg.eigvalsh(gram)
        assert gram.shape[-1] == small
        # This quintic iteration maps singular values into roughly [0.7, 1.2], not exactly 1.
        assert sv.min() > 0.4 and sv.max() < 1.5


def test_muon_accepts_schedules(muon_ref):
    const = optim.muon(0.025, 0.95, weight_decay=0.04, momentum_dtype=jnp.float32, ns_dtype=jnp.float32)
    sched = optim.muon(lambda c: 0.025 * jnp.ones([]), lambda c: jnp.where(c >= 0, 0.95, 0.0), weight_decay=0.04,
                       momentum_dtype=jnp.float32, ns_dtype=jnp.float32)
    p = {"qo_bank": jnp.asarray(muon_ref["init/qo_bank"])}
    g = {"qo_bank": jnp.asarray(muon_ref["grad0/qo_bank"])}
    a, _ = const.update(g, const.init(p), p)
    b, _ = sched.update(g, sched.init(p), p)
    np.testing.assert_array_equal(np.asarray(a["qo_bank"]), np.asarray(b["qo_bank"]))


def test_muon_is_its_direction_then_decoupled_decay_then_the_learning_rate(muon_ref):
    """muon = chain(scale_by_muon, add_decayed_weights, scale_by_learning_rate):
    the update is -lr (direction + wd p), the direction max(1, rows/cols)^0.5 O."""
    p = {b: jnp.asarray(muon_ref[f"init/{b}"]) for b in BANKS}
    g = {b: jnp.asarray(muon_ref[f"grad0/{b}"]) for b in BANKS}
    direction = optim.scale_by_muon(0.95, momentum_dtype=jnp.float32, ns_dtype=jnp.float32)
    d, _ = direction.update(g, direction.init(p))
    full = optim.muon(0.025, 0.95, weight_decay=0.04, momentum_dtype=jnp.float32, ns_dtype=jnp.float32)
    u, _ = full.update(g, full.init(p), p)
    for b in BANKS:
        np.testing.assert_array_equal(u[b], -0.025 * (d[b] + 0.04 * p[b]))
        rows, cols = p[b].shape[-2:]
        # The first step's nesterov input is g + 0.95 (0.95 * 0 + g) = 1.95 g.
        np.testing.assert_allclose(d[b], max(1.0, rows / cols) ** 0.5 * optim.newton_schulz(1.95 * g[b], 5, jnp.float32),
                                   rtol=1e-5, atol=1e-6)  # float32 rounding of 1.95 g apart (~1e-7 seen)


def test_every_parameter_lands_in_its_group():
    cfg = ModelConfig()
    params = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))
    got = {param_tree.path_name(p): label for p, label in jax.tree_util.tree_leaves_with_path(optim.param_labels(params))}
    want = {
        "qo_bank": "muon", "kv_bank": "muon", "mlp_up_bank": "muon", "mlp_down_bank": "muon",
        "tok_emb": "embed", "bigram/embed": "embed", "ve/embed": "embed",
        "bigram/proj": "scalar", "bigram/scale": "scalar", "ve/proj": "scalar", "ve/scale": "scalar",
        "ve/layer_scales": "scalar", "smear_gate": "scalar", "skip_weights": "scalar",
        "blocks/attn_scale": "scalar", "blocks/mlp_scale": "scalar", "blocks/resid_mix": "scalar",
        "blocks/q_gain": "scalar",
    }
    assert got == want
    untied = jax.eval_shape(lambda k: model.init_params(dataclasses.replace(cfg, tie_embeddings=False), k),
                            jax.random.key(0))
    assert optim.param_labels(untied)["lm_head"] == "head"


def test_adamw_groups_rates_and_decay():
    """First AdamW step: update = -lr (g / (|g| + eps) + wd p), with each group's lr."""
    cfg = OptimizerConfig(grad_clip_norm=1e9)
    tx = optim.build_optimizer(cfg)
    params = {"tok_emb": jnp.full((4, 3), 0.5), "smear_gate": jnp.full((3,), -2.0), "qo_bank": jnp.zeros((2, 4, 4))}
    grads = {"tok_emb": jnp.full((4, 3), 0.3), "smear_gate": jnp.full((3,), -0.7), "qo_bank": jnp.zeros((2, 4, 4))}
    updates, _ = tx.update(grads, tx.init(params), params)
    wd = cfg.adam_weight_decay
    np.testing.assert_allclose(updates["tok_emb"], -cfg.tied_embed_lr * (1 + wd * 0.5), rtol=1e-6)
    np.testing.assert_allclose(updates["smear_gate"], -cfg.scalar_lr * (-1 + wd * -2.0), rtol=1e-6)


def test_global_clip_is_torchs():
    tx = optim.clip_by_global_norm(0.3)
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}  # norm 13
    out, _ = tx.update(g, tx.init(g))
    coef = 0.3 / (13.0 + 1e-6)
    np.testing.assert_allclose(out["a"], np.array([3.0, 4.0]) * coef, rtol=1e-6)
    small = {"a": jnp.array([0.1, 0.1])}
    np.testing.assert_array_equal(tx.update(small, tx.init(small))[0]["a"], small["a"])  # below the limit: untouched


def test_momentum_warmup_schedule():
    sched = optim.muon_momentum_schedule(OptimizerConfig())
    values = [float(sched(jnp.asarray(s))) for s in (0, 750, 1500, 5000)]
    np.testing.assert_allclose(values, [0.92, 0.955, 0.99, 0.99], rtol=1e-6)


def test_lr_multiplier_iterations_and_wallclock():
    no_cap = ScheduleConfig(iterations=20_000, warmdown_iters=4000, max_wallclock_seconds=0)
    assert optim.lr_multiplier(0, 0.0, no_cap) == 1.0
    assert optim.lr_multiplier(15_999, 0.0, no_cap) == 1.0
    assert optim.lr_multiplier(16_000, 0.0, no_cap) == 1.0
    assert optim.lr_multiplier(18_000, 0.0, no_cap) == pytest.approx(0.5)
    assert optim.lr_multiplier(19_999, 0.0, no_cap) == pytest.approx(1 / 4000)
    cap = ScheduleConfig(warmdown_iters=4000, max_wallclock_seconds=600)
    # 86.6 ms/step: the warmdown spans 4000 x 86.6 ms = 346.4 s, so it starts at 253.6 s.
    assert optim.lr_multiplier(2000, 2000 * 0.0866, cap) == 1.0
    assert optim.lr_multiplier(4000, 4000 * 0.0866, cap) == pytest.approx((600 - 346.4) / 346.4)
    assert optim.lr_multiplier(6922, 600.0, cap) == 0.0
    assert optim.lr_multiplier(5, 1.0, dataclasses.replace(cap, warmdown_iters=0)) == 1.0
