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
import types

from tests.conftest import fixture_path, reference_source
from tests.conftest import round_to_bf16 as bf16

# Rounding bit for bit against torch (and the reference's fixtures): compiled as users' programs are.
pytestmark = pytest.mark.full_optimization

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
    # two steps are not (measured 2.5-5.0% of the step; before the reference's
    # rounding order was followed, 7-13%). The fixture was made on the CPU,
    # where torch rounds the alpha of g.add(buf, alpha=momentum) to bf16 (0.95
    # -> 0.9492); on CUDA it does not (scripts/torch_bf16_scalar_probe.py), and
    # golf_jax follows CUDA. With 0.9492 in that one place, three banks' first
    # step lands within 2e-6 (docs/fidelity.md); the iteration amplifies the
    # rest.
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
    # The 1.0611 record's: every new tensor is in its scalar AdamW (CONTROL_TENSOR_NAME_PATTERNS, and
    # the SmearGate's added by hand), the banks in Muon, tok_emb in the embedding's AdamW.
    frontier = dataclasses.replace(cfg, bigram_vocab_size=0, ve_enabled=False, num_loops=2, loop_start=3, loop_end=5,
                                   skip_gates=True, parallel_start_layer=8, sparse_attn_gate=True, smear_gate="windowed")
    params = jax.eval_shape(lambda k: model.init_params(frontier, k), jax.random.key(0))
    got = {param_tree.path_name(p): label for p, label in jax.tree_util.tree_leaves_with_path(optim.param_labels(params))}
    for name in ("bigram/embed", "bigram/proj", "bigram/scale", "ve/embed", "ve/proj", "ve/scale", "ve/layer_scales",
                 "smear_gate"):
        del want[name]
    want.update({name: "scalar" for name in ("skip_gates", "parallel_resid_lambdas", "parallel_post_lambdas",
                                             "smear/gate", "smear/lambda", "blocks/attn_gate_w")})
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
    np.testing.assert_allclose(updates["tok_emb"], -cfg.tied_embed_lr * (1 + cfg.embed_weight_decay * 0.5), rtol=1e-6)
    np.testing.assert_allclose(updates["smear_gate"], -cfg.scalar_lr * (-1 + cfg.adam_weight_decay * -2.0), rtol=1e-6)
    # The 1.0611 record decays the tables and the scalars differently (0.085, 0.02).
    cfg = OptimizerConfig(grad_clip_norm=1e9, embed_weight_decay=0.085, adam_weight_decay=0.02)
    tx = optim.build_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["tok_emb"], -cfg.tied_embed_lr * (1 + 0.085 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(updates["smear_gate"], -cfg.scalar_lr * (-1 + 0.02 * -2.0), rtol=1e-6)


def test_untied_head_is_adam_without_decay():
    """The reference steps an untied lm_head with torch.optim.Adam: no weight decay."""
    cfg = OptimizerConfig(grad_clip_norm=1e9)
    tx = optim.build_optimizer(cfg)
    params = {"lm_head": jnp.full((4, 3), 0.5), "smear_gate": jnp.full((3,), 0.5)}
    grads = {"lm_head": jnp.full((4, 3), 0.3), "smear_gate": jnp.full((3,), 0.3)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["lm_head"], -cfg.head_lr, rtol=1e-6)
    np.testing.assert_allclose(updates["smear_gate"], -cfg.scalar_lr * (1 + cfg.adam_weight_decay * 0.5), rtol=1e-6)


def test_adamw_on_a_bf16_table_computes_in_float32():
    """As torch's fused AdamW: a bf16 table's step is computed in float32 from its
    bf16 parameter, gradient and moments, the moments stored back in bf16, the
    update left float32. Two steps against a float32 emulation: the learning
    rate is 0.035, not its bf16 rounding 0.03491, and the betas 0.9 and 0.95,
    not 0.8984 and 0.9492 (what optax's adamw computes on a bf16 table)."""
    lr, b1, b2, eps, wd = 0.035, 0.9, 0.95, 1e-8, 0.04
    tx = optim.adamw(lr, b1, b2, eps, wd)
    p = bf16(np.linspace(-0.4, 0.6, 24).reshape(4, 6))
    g1 = bf16(np.geomspace(1e-9, 0.3, 24).reshape(4, 6) * np.where(np.arange(24) % 3, 1, -1).reshape(4, 6))
    g2 = bf16(np.geomspace(0.2, 3e-9, 24).reshape(4, 6))
    params = {"tok_emb": jnp.asarray(p).astype(jnp.bfloat16)}
    state = tx.init(params)
    m = v = np.zeros_like(p, np.float32)
    for t, g in enumerate((g1, g2), start=1):
        updates, state = tx.update({"tok_emb": jnp.asarray(g).astype(jnp.bfloat16)}, state, params)
        assert updates["tok_emb"].dtype == jnp.float32
        m32 = np.float32(b1) * m + np.float32(1 - b1) * g
        v32 = np.float32(b2) * v + np.float32(1 - b2) * g * g
        direction = m32 / np.float32(1 - b1 ** t) / (np.sqrt(v32) / np.float32(np.sqrt(1 - b2 ** t)) + np.float32(eps))
        want = -lr * (direction + wd * p)
        np.testing.assert_allclose(updates["tok_emb"], want, rtol=2e-6, atol=1e-12)  # float32 rounding apart
        mu, nu = state[0].mu["tok_emb"], state[0].nu["tok_emb"]
        assert mu.dtype == nu.dtype == jnp.bfloat16
        # The moments are rounded to bf16 once per step; a float32 ulp apart can flip a tie.
        assert np.mean(np.asarray(mu, np.float32) != bf16(m32)) <= 1 / 24
        assert np.mean(np.asarray(nu, np.float32) != bf16(v32)) <= 1 / 24
        m, v = np.asarray(mu, np.float32), np.asarray(nu, np.float32)
        p = bf16(p + np.asarray(updates["tok_emb"]))
        params = {"tok_emb": jnp.asarray(p).astype(jnp.bfloat16)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_adamw_matches_torchs_fused_adamw(dtype):
    """Six steps of torch.optim.AdamW(fused=True) (the reference's, here on the CPU) against
    golf_jax's adamw applied as the training step applies it (p + lr_mult u, rounded once), with
    the learning rate halved for the last three (the warmdown), on gradients from 1e-9 to 0.1
    (Adam's eps regime included)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shape = (64, 48)
    p0 = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    scale = np.exp(rng.uniform(np.log(1e-9), np.log(1e-1), size=shape)).astype(np.float32)
    tdt, jdt = getattr(torch, dtype), jnp.dtype(dtype)
    tp = torch.nn.Parameter(torch.from_numpy(p0).to(tdt))
    opt = torch.optim.AdamW([tp], lr=0.035, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.04, fused=True)
    tx = optim.adamw(0.035, 0.9, 0.95, 1e-8, 0.04)
    jp = jnp.asarray(p0).astype(jdt)
    state = tx.init(jp)

    @jax.jit
    def step(g, state, p, mult):
        u, state = tx.update(g, state, p)
        return (p.astype(jnp.float32) + mult * u.astype(jnp.float32)).astype(p.dtype), state

    m_prev, start = np.zeros(shape, np.float32), tp.detach().float().numpy()
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    for i in range(6):
        mult = 1.0 if i < 3 else 0.5
        opt.param_groups[0]["lr"] = 0.035 * mult
        g = (rng.standard_normal(shape) * scale).astype(np.float32)
        tp.grad = torch.from_numpy(g).to(tdt)
        opt.step()
        jp, state = step(jnp.asarray(g).astype(jdt), state, jp, mult)
        want, got = tp.detach().float().numpy(), np.asarray(jp, np.float32)
        m_want, m_got = opt.state[tp]["exp_avg"].float().numpy(), np.asarray(state[0].mu, np.float32)
        v_want, v_got = opt.state[tp]["exp_avg_sq"].float().numpy(), np.asarray(state[0].nu, np.float32)
        if dtype == "float32":
            # torch forms some coefficients in float64 and m by a lerp: float32 rounding apart,
            # of the terms of b1 m + (1 - b1) g where they cancel.
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-7)
            assert np.all(np.abs(m_got - m_want) <= 1e-6 * (np.abs(m_prev) + np.abs(g))), i
            np.testing.assert_allclose(v_got, v_want, rtol=1e-5, atol=0)
        else:
            # Bit for bit but where float32 rounding puts a value on the other side of a bf16 tie;
            # the moments carry such an ulp on (and one ulp of a bf16 moment is up to 2^-7 of the
            # step). Measured: the first two steps bit-identical, then at most 0.3% of the
            # parameters apart, 2.2e-4 of the distance travelled, moments 1.2e-4. optax's adamw (bf16
            # arithmetic) gave 50-64% of the parameters apart, 5.8e-3 to 7.1e-3, moments 2.3e-3 to 6.8e-3.
            assert np.mean(want != got) <= 0.01, i
            assert rel(got - start, want - start) <= 1e-3, i
            assert rel(m_got, m_want) <= 1e-3 and rel(v_got, v_want) <= 1e-3, i
            if i < 2:
                np.testing.assert_array_equal(got, want)
        m_prev = m_want


def test_global_clip_rounds_as_the_reference_on_a_gpu():
    """A bf16 gradient's norm is rounded to bf16 before the total (torch._foreach_norm), and a
    bf16 gradient is multiplied by the coefficient rounded to bf16 (CUDA's cast of the float32
    0-dim coefficient; scripts/torch_bf16_scalar_probe.py); float32 gradients by the coefficient."""
    tx = optim.clip_by_global_norm(0.3)
    t = bf16(np.linspace(0.01, 0.9, 40).reshape(8, 5))
    f = np.linspace(-1.0, 2.0, 7).astype(np.float32)
    g = {"table": jnp.asarray(t).astype(jnp.bfloat16), "f": jnp.asarray(f)}
    out, _ = tx.update(g, tx.init(g))
    norm = np.sqrt(np.float32(bf16(np.linalg.norm(t.astype(np.float64)))) ** 2 + np.sum(f.astype(np.float64) ** 2))
    coef = 0.3 / (norm + 1e-6)
    np.testing.assert_allclose(out["f"], f * coef, rtol=1e-6)
    assert out["table"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["table"], np.float32), bf16(t * bf16(coef)))


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


def test_these_tests_compile_with_every_optimisation():
    # The module's marker (conftest): on the CPU the rest of the suite compiles without LLVM's expensive passes.
    assert not jax.config.values["jax_disable_most_optimizations"]


# ----------------------------------------------------------------------------- the 1.0611 record's Muon and schedule

FRONTIER = "frontier_1855/train_gpt.py"


def frontier_newton_schulz(torch, float32: bool = False):
    """The 1.0611 record's zeropower_via_newtonschulz5 run eagerly (its @torch.compile
    left out); float32=True runs the same code with float32 in place of bfloat16."""
    src = reference_source(FRONTIER, "_PE_COEFFS", "zeropower_via_newtonschulz5")
    if float32:
        src = src.replace("G.bfloat16()", "G.float()")
    namespace = {"torch": torch}
    exec(src, namespace)
    return namespace["zeropower_via_newtonschulz5"]


def test_polar_express_coefficients_are_the_frontiers():
    namespace = {}
    exec(reference_source(FRONTIER, "_PE_COEFFS"), namespace)
    assert optim.POLAR_EXPRESS_COEFFS == namespace["_PE_COEFFS"]
    assert optim.ns_coefficients("polar_express", 5) == namespace["_PE_COEFFS"]
    assert optim.ns_coefficients("polar_express", 10) == namespace["_PE_COEFFS"]  # its slice guard: five at most
    assert optim.ns_coefficients("quintic", 3) == (optim.NS_COEFFS,) * 3


@pytest.mark.parametrize("shape", [(3, 48, 80), (2, 96, 40)])
def test_polar_express_newton_schulz_matches_the_frontier_run_eagerly(shape):
    """Wide and tall batches: bf16 bit for bit against the reference's function run
    eagerly (rounding="eager"); float32 to 1e-5 (summation order)."""
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = frontier_newton_schulz(torch)(torch.from_numpy(g), steps=5).float().numpy()
    got = optim.newton_schulz(jnp.asarray(g), 5, jnp.bfloat16, "polar_express", "eager")
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    want32 = frontier_newton_schulz(torch, float32=True)(torch.from_numpy(g), steps=5).numpy()
    got32 = np.asarray(optim.newton_schulz(jnp.asarray(g), 5, jnp.float32, "polar_express", "eager"))
    assert np.linalg.norm(got32 - want32) / np.linalg.norm(want32) < 1e-5


def test_compiled_rounding_rounds_once_per_fused_expression():
    """rounding="compiled" (the 1.0611 record's @torch.compile'd kernels): in float32 it is
    the same iteration; in bf16 it rounds less often than eager PyTorch, so its output
    differs from eager's in the last bits but stays as close to the float32 result.
    (Its match with Inductor's kernels on the GPU is not measured: docs/fidelity.md.)"""
    g = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 96)).astype(np.float32))
    f32 = [np.asarray(optim.newton_schulz(g, 5, jnp.float32, "polar_express", r)) for r in ("eager", "compiled")]
    np.testing.assert_array_equal(f32[0], f32[1])
    eager, compiled = (np.asarray(optim.newton_schulz(g, 5, jnp.bfloat16, "polar_express", r), np.float32)
                       for r in ("eager", "compiled"))
    assert not np.array_equal(eager, compiled)
    err = lambda x: np.linalg.norm(x - f32[0]) / np.linalg.norm(f32[0])  # noqa: E731
    # bf16 against float32 after five steps: a few percent either way (the iteration
    # amplifies rounding; tests/optim_test.py's bf16 Muon check measures the same).
    assert err(compiled) < 0.06 and err(eager) < 0.06


def test_row_normalisation_matches_the_frontiers_expression():
    """update / update.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(update.dtype),
    eager PyTorch in bf16 (a zero row included: the clamp)."""
    torch = pytest.importorskip("torch")
    u = np.random.default_rng(2).standard_normal((2, 8, 24)).astype(np.float32)
    u[0, 3] = 0.0
    tu = torch.from_numpy(u).bfloat16()
    want = (tu / tu.float().norm(dim=-1, keepdim=True).clamp_min(1e-07).to(tu.dtype)).float().numpy()
    got = optim.normalize_rows(jnp.asarray(tu.float().numpy()), optim.rounding_to(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    rows = np.linalg.norm(np.asarray(optim.normalize_rows(jnp.asarray(u), lambda x: x)), axis=-1)
    np.testing.assert_allclose(rows[rows > 0], 1.0, rtol=1e-6)


def test_muon_with_row_normalisation_and_polar_express():
    """scale_by_muon as the 1.0611 record configures it: Nesterov, then the rows normalised,
    then Polar Express (float32 here: the algorithm without its rounding)."""
    g = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32, 48)).astype(np.float32))
    tx = optim.scale_by_muon(0.95, True, 5, jnp.float32, jnp.float32, "polar_express", "compiled", True)
    out, _ = tx.update({"b": g}, tx.init({"b": g}))
    u = g + 0.95 * g  # Nesterov's first step: buf = g, u = g + m buf
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    want = optim.newton_schulz(u, 5, jnp.float32, "polar_express", "compiled")  # rows <= cols: scale 1
    np.testing.assert_allclose(np.asarray(out["b"]), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_fraction_schedule_is_the_frontiers():
    """The 1.0611 record's training_frac and lr_mul (run from its code) against
    lr_multiplier with warmdown_frac 0.85 and min_lr_mult 0.1: with a cap (599.5 s, the
    600 s less its 0.5 s reserve) and without one (the share of the iterations)."""
    namespace = {}
    exec(reference_source(FRONTIER, "training_frac", "lr_mul"), namespace)
    namespace["h"] = types.SimpleNamespace(warmdown_frac=0.85, min_lr=0.1, iterations=5000)
    for cap in (599.5, 0.0):
        namespace["max_wallclock_ms"] = cap * 1e3 if cap else None
        sched = ScheduleConfig(iterations=5000, max_wallclock_seconds=cap, warmdown_frac=0.85, min_lr_mult=0.1)
        for step, elapsed in [(0, 0.0), (700, 60.0), (750, 89.925), (751, 90.0), (2500, 300.0), (4400, 560.0),
                              (4900, 599.4), (5000, 599.5)]:
            want = namespace["lr_mul"](namespace["training_frac"](step, elapsed * 1e3))
            assert optim.lr_multiplier(step, elapsed, sched) == pytest.approx(want, rel=1e-12), (cap, step)
    # The same points span the whole schedule: flat, the ramp, the floor.
    with_cap = ScheduleConfig(max_wallclock_seconds=599.5, warmdown_frac=0.85, min_lr_mult=0.1)
    assert optim.lr_multiplier(0, 60.0, with_cap) == 1.0
    assert optim.lr_multiplier(0, 300.0, with_cap) == pytest.approx((1 - 300 / 599.5) / 0.85)
    assert optim.lr_multiplier(0, 580.0, with_cap) == 0.1


def test_frontier_optimizer_settings_are_checked():
    from golf_jax import cli
    from golf_jax.config import Config, ConfigError
    for key, value in (("optimizer.muon_ns_coefficients", "cubic"), ("optimizer.muon_ns_rounding", "lazy"),
                       ("schedule.warmdown_frac", "1.5"), ("schedule.min_lr_mult", "-0.1")):
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            cli.apply_overrides(Config(), [(key, value)]).validate()



def test_muon_step_is_the_frontiers_in_float32():
    """Two steps of the 1.0611 record's own Muon (its non-distributed path: Nesterov,
    rows normalised, Polar Express, decoupled decay; run eagerly, with float32 in place
    of its bf16 casts: the algorithm without the rounding) against optim.muon."""
    torch = pytest.importorskip("torch")
    src = reference_source(FRONTIER, "_PE_COEFFS", "zeropower_via_newtonschulz5", "Muon")
    for bf16_cast, f32_cast in (("G.bfloat16()", "G.float()"), ("p.grad.bfloat16()", "p.grad.float()"),
                                ("dtype=torch.bfloat16", "dtype=torch.float32")):
        assert bf16_cast in src
        src = src.replace(bf16_cast, f32_cast)
    namespace = {"torch": torch, "dist": torch.distributed}
    exec(src, namespace)
    rng = np.random.default_rng(4)
    shapes = {"wide": (3, 24, 40), "tall": (2, 48, 16)}  # the tall one scaled by sqrt(rows / cols)
    init = {b: rng.standard_normal(s).astype(np.float32) * 0.1 for b, s in shapes.items()}
    grads = [{b: rng.standard_normal(s).astype(np.float32) for b, s in shapes.items()} for _ in range(2)]
    lr, momentum, wd = 0.026, 0.92, 0.095
    tensors = {b: torch.nn.Parameter(torch.from_numpy(v.copy())) for b, v in init.items()}
    reference = namespace["Muon"](list(tensors.values()), lr=lr, momentum=momentum, backend_steps=5,
                                  weight_decay=wd, row_normalize=True)
    tx = optim.muon(lr, momentum, nesterov=True, ns_steps=5, weight_decay=wd, momentum_dtype=jnp.float32,
                    ns_dtype=jnp.float32, ns_coefficients="polar_express", ns_rounding="compiled", row_normalize=True)
    params = {b: jnp.asarray(v) for b, v in init.items()}
    state, prev = tx.init(params), dict(init)
    for g in grads:
        for b, t in tensors.items():
            t.grad = torch.from_numpy(g[b])
        reference.step()
        updates, state = tx.update({b: jnp.asarray(v) for b, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for b, t in tensors.items():
            want = t.detach().numpy().copy()
            # float32, its p (1 - lr wd) - lr s O against our p - lr (s O + wd p): measured 3e-6 of the step.
            assert relative_to_step(params[b], want, prev[b]) <= 1e-4, b
            prev[b] = want


def test_exact_momentum_warmup_is_the_frontiers_step_fn():
    """The 1.0611 record's step_fn (its own code, run on stubs: no micro-batches, no clip)
    sets Muon's momentum for each step; muon_momentum_warmup_exact gives that value, rounded
    to float32 as torch's arithmetic takes the Python float, at every step of the warm-up
    and after it. optax's float32 schedule (the 1.1147 record's setting) is 1 ulp off at some."""
    torch = pytest.importorskip("torch")
    optimizers = type("Optimizers", (list,), {})()
    optimizers.optimizer_muon = types.SimpleNamespace(param_groups=[{}])
    optimizers.step = lambda distributed: None
    h = types.SimpleNamespace(grad_accum_steps=0, muon_momentum_warmup_steps=1500, muon_momentum_warmup_start=0.92,
                              muon_momentum=0.97, grad_clip_norm=0, distributed=False)
    namespace = {"torch": torch, "h": h, "optimizers": optimizers, "device": "cpu"}
    exec(reference_source(FRONTIER, "step_fn"), namespace)
    want = []
    for step in range(1600):
        namespace["step_fn"](step, 1.0)
        want.append(np.float32(optimizers.optimizer_muon.param_groups[0]["momentum"]))
    cfg = OptimizerConfig(muon_momentum=0.97, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500,
                          muon_momentum_warmup_exact=True)
    counts = jnp.arange(1600)
    np.testing.assert_array_equal(np.asarray(jax.vmap(optim.muon_momentum_schedule(cfg))(counts)), want)
    linear = jax.vmap(optim.muon_momentum_schedule(dataclasses.replace(cfg, muon_momentum_warmup_exact=False)))
    assert np.sum(np.asarray(linear(counts)) != want) > 100


def test_training_schedule_takes_the_reserve_off_the_cap():
    """The 1.0611 record's max_wallclock_ms = 1e3 * 600 - 0.5 * 1e3: the fraction (and so the
    multiplier and the loop switch) and the stop aim at 599.5 s; without a cap nothing changes."""
    sched = ScheduleConfig(max_wallclock_seconds=600.0, gptq_reserve_seconds=0.5, warmdown_frac=0.85)
    training = optim.training_schedule(sched)
    assert training.max_wallclock_seconds == 599.5 and training.gptq_reserve_seconds == 0.5
    assert optim.training_fraction(100, 209.825, training) == pytest.approx(0.35, rel=1e-15)
    assert optim.training_fraction(100, 0.0, dataclasses.replace(training, max_wallclock_seconds=0.0,
                                                                 iterations=400)) == 0.25
    no_cap = dataclasses.replace(sched, max_wallclock_seconds=0.0)
    assert optim.training_schedule(no_cap) is no_cap and optim.training_schedule(ScheduleConfig()) == ScheduleConfig()
