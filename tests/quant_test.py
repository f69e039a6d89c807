"""GPTQ int6, the row quantisers and whole-model quantisation against the
reference, plus the Hessians the reference crashed on."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import param_tree, quant
from golf_jax.config import QuantConfig
from tests.conftest import fixture_path

CLIP = 31


@pytest.fixture(scope="module")
def gptq_ref():
    with np.load(fixture_path("gptq.npz")) as z:
        return {k: z[k] for k in z.files}


def recon_err_H(W, q, s, H) -> float:
    """mean over rows of (W - q s) H (W - q s)^T, in float64."""
    D = np.asarray(W, np.float64) - np.asarray(q, np.float64) * np.asarray(s, np.float64)[..., None]
    return float(np.mean(np.einsum("...oi,...ij,...oj->...o", D, np.asarray(H, np.float64), D)))


def params_leaf(params, name: str):
    """The leaf of a params tree at a `param_tree.path_name` name."""
    for section in name.split("/"):
        params = params[section]
    return params


def spd_hessians(rng, n: int, dim: int) -> np.ndarray:
    """X^T X / samples of random activations, one per matrix: [n, dim, dim].
    4 dim samples keep the eigenvalues within about [0.25, 2.25] (Marchenko-Pastur)."""
    X = rng.normal(size=(n, 4 * dim, dim)).astype(np.float32)
    return np.einsum("nbi,nbj->nij", X, X) / (4 * dim)


# ----------------------------------------------------------------------------- reference parity

def test_gptq_matches_reference(gptq_ref):
    W, H = gptq_ref["W"], gptq_ref["H"]
    q, s, report = quant.gptq_int6(W, H)
    q, s = np.asarray(q), np.asarray(s)
    assert q.dtype == np.int8 and s.dtype == np.float16 and q.shape == W.shape
    assert report == quant.GPTQReport(damping=pytest.approx(0.01), fallback=False)
    # A float32 port of the same algorithm: every quantised value matches (100% measured).
    np.testing.assert_array_equal(q, gptq_ref["q"])
    np.testing.assert_array_equal(s, gptq_ref["scale_f16"])
    # Same values, so the same error up to float32 summation order.
    assert recon_err_H(W, q, s, H) <= (1 + 1e-5) * float(gptq_ref["ref_recon_err_H"])
    # The point of GPTQ: less output error than rounding row by row.
    assert recon_err_H(W, q, s, H) < float(gptq_ref["ref_recon_err_H_rowwise"])


def test_row_int6_matches_reference(gptq_ref):
    q, s = quant.quantize_int6_rows(gptq_ref["W"])
    np.testing.assert_array_equal(np.asarray(q), gptq_ref["q_rowwise"])
    np.testing.assert_array_equal(np.asarray(s).astype(np.float32), gptq_ref["scale_rowwise"])
    assert recon_err_H(gptq_ref["W"], q, s, gptq_ref["H"]) <= 1.001 * float(gptq_ref["ref_recon_err_H_rowwise"])


def test_int8_rows_match_reference(gptq_ref):
    q, s = quant.quantize_int8_rows(gptq_ref["E"])
    assert q.dtype == jnp.int8 and s.dtype == jnp.float16
    # Exact: this also pins that the division uses the float32 scale (the
    # stored fp16 one changes 39 of the fixture's values).
    np.testing.assert_array_equal(np.asarray(q), gptq_ref["q_int8"])
    np.testing.assert_array_equal(np.asarray(s).astype(np.float32), gptq_ref["scale_int8"])


# ----------------------------------------------------------------------------- percentile search

def test_quantile_is_linear_interpolation():
    a = np.sort(np.abs(np.random.default_rng(0).normal(size=(8, 320))), axis=-1).astype(np.float32)
    for pct in (*quant.CLIP_PERCENTILES[:-1], quant.INT8_CLIP_PERCENTILE):
        got = np.asarray(quant._quantile_sorted(jnp.asarray(a), pct))
        # torch's rank pct * (n - 1) is float32, numpy's float64: off by up to
        # ~2^-24 * 320 index units times the gap between neighbours in the tail.
        np.testing.assert_allclose(got, np.quantile(a, pct, axis=-1), rtol=1e-4)


def test_row_int6_picks_the_clip_of_least_error():
    # Scaled up so that the clip, not the 1/31 floor, sets the scales (in the
    # fixture the floor sets every one) and heavy-tailed so the levels differ.
    W = (20 * np.random.default_rng(1).standard_t(3, size=(64, 256))).astype(np.float32)
    q, s = quant.quantize_int6_rows(W)
    errs, cands = [], []
    for pct in quant.CLIP_PERCENTILES:
        clip = np.quantile(np.abs(W), pct, axis=1).astype(np.float32)
        s_p = np.maximum(clip / np.float32(CLIP), np.float32(1 / CLIP)).astype(np.float16)
        q_p = np.clip(np.round(W / s_p.astype(np.float32)[:, None]), -CLIP, CLIP)
        errs.append(np.mean((W - q_p * s_p.astype(np.float32)[:, None]) ** 2))
        cands.append((q_p, s_p))
    assert len({e for e in errs}) > 1  # the search has something to choose
    q_best, s_best = cands[int(np.argmin(errs))]
    np.testing.assert_array_equal(np.asarray(s), s_best)
    np.testing.assert_array_equal(np.asarray(q), q_best)


def test_gptq_with_identity_hessian_is_row_rounding():
    # With H = I no error has anywhere to go: GPTQ reduces to the row quantiser,
    # percentile search included.
    W = (20 * np.random.default_rng(2).standard_t(3, size=(32, 200))).astype(np.float32)
    q, s, _ = quant.gptq_int6(W, np.eye(200, dtype=np.float32), block_size=64)
    q_rows, s_rows = quant.quantize_int6_rows(W)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q_rows))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_rows))


# ----------------------------------------------------------------------------- robustness

def hessians_needing_help(dim: int = 64) -> np.ndarray:
    """[well-conditioned, needs 10% damping, hopeless]: all with a positive diagonal."""
    rng = np.random.default_rng(3)
    good = spd_hessians(rng, 1, dim)[0]
    # Rank-deficient X^T X (8 samples) minus 5% of the mean diagonal along a
    # null direction: an eigenvalue of -5%, which 1% damping cannot lift.
    X = rng.normal(size=(8, dim)).astype(np.float32)
    singular = X.T @ X / 8
    v = np.linalg.svd(X)[2][-1]
    indefinite = singular - 0.05 * np.mean(np.diag(singular)) * np.outer(v, v)
    # 2I - 11^T: unit diagonal, an eigenvalue of 2 - dim, past every damping step.
    hopeless = 2 * np.eye(dim) - np.ones((dim, dim))
    assert np.all(np.diag(indefinite) > 0)
    return np.stack([good, indefinite, hopeless]).astype(np.float32)


def test_gptq_bank_survives_indefinite_hessians():
    H = hessians_needing_help()
    W = (0.5 * np.random.default_rng(4).normal(size=(3, 16, 64))).astype(np.float32)
    q, s, report = quant.gptq_int6_bank(W, H)
    q, s = np.asarray(q), np.asarray(s)
    assert np.all(np.abs(q) <= CLIP) and np.all(np.isfinite(s)) and np.all(s > 0)
    np.testing.assert_allclose(report.damping[:2], [0.01, 0.1], rtol=1e-6)  # float32 of the ladder
    assert np.isnan(report.damping[2])
    np.testing.assert_array_equal(report.fallback, [False, False, True])
    q_rows, s_rows = quant.quantize_int6_rows(W[2])
    np.testing.assert_array_equal(q[2], np.asarray(q_rows))
    np.testing.assert_array_equal(s[2], np.asarray(s_rows))
    # The first matrix is unaffected by its neighbours' trouble.
    q0, s0, _ = quant.gptq_int6(W[0], H[0])
    np.testing.assert_array_equal(q[0], np.asarray(q0))


def test_gptq_refuses_nan_with_the_tensor_name(gptq_ref):
    H = gptq_ref["H"].copy()
    H[3, 5] = np.nan
    with pytest.raises(quant.QuantError, match=r"blocks.3.attn.c_q: H holds NaN"):
        quant.gptq_int6(gptq_ref["W"], H, name="blocks.3.attn.c_q")
    W = np.zeros((2, 4, 8), np.float32)
    W[1, 0, 0] = np.inf
    with pytest.raises(quant.QuantError, match=r"qo_bank\[1\]: W holds NaN or inf"):
        quant.gptq_int6_bank(W, np.stack([np.eye(8, dtype=np.float32)] * 2), name="qo_bank")
    with pytest.raises(quant.QuantError, match="do not fit"):
        quant.gptq_int6_bank(W, np.eye(8, dtype=np.float32)[None], name="qo_bank")


# ----------------------------------------------------------------------------- whole model

EXPECTED_KINDS = {
    "qo_bank": quant.INT6, "kv_bank": quant.INT6, "mlp_up_bank": quant.INT6, "mlp_down_bank": quant.INT6,
    "tok_emb": quant.INT8, "bigram/embed": quant.INT8, "ve/embed": quant.INT8,  # > 65,536 values
    "bigram/proj": quant.FP16, "ve/proj": quant.FP16,  # <= 65,536 values
    # reference quirk: the <= 65,536-value rule comes first, so the control scalars are fp16 too
    "blocks/attn_scale": quant.FP16, "blocks/mlp_scale": quant.FP16, "blocks/resid_mix": quant.FP16,
    "blocks/q_gain": quant.FP16, "skip_weights": quant.FP16, "smear_gate": quant.FP16,
    "bigram/scale": quant.FP16, "ve/scale": quant.FP16, "ve/layer_scales": quant.FP16,
}
GPTQ_BANKS = ("qo_bank", "mlp_down_bank")  # the other two take the Hessian-free path


@pytest.fixture(scope="module")
def quantized_tiny(tiny_params, tiny_cfg):
    params = param_tree.cast_params(tiny_params, tiny_cfg)  # bf16 embedding tables, as in the record
    rng = np.random.default_rng(5)
    hessians = {b: spd_hessians(rng, *params[b].shape[::2]) for b in GPTQ_BANKS}
    hessians["kv_bank"] = None
    # generate.collect_hessians also gives the small projections': unused (kept fp16).
    hessians["bigram/proj"] = spd_hessians(rng, 1, tiny_cfg.bigram_dim)[0]
    qmodel, report = quant.quantize_params(params, tiny_cfg, hessians, QuantConfig())
    return params, hessians, qmodel, report


def test_quantize_params_kinds_and_report(quantized_tiny, tiny_cfg):
    params, _, qmodel, report = quantized_tiny
    assert {n: qt.kind for n, qt in qmodel.items()} == EXPECTED_KINDS
    for name, qt in qmodel.items():
        assert qt.dtype == jnp.dtype(params_leaf(params, name).dtype).name
        if qt.kind in (quant.INT6, quant.INT8):
            assert qt.data.dtype == np.int8 and qt.scale.dtype == np.float16
            assert qt.scale.shape == qt.data.shape[:-1]
            assert np.abs(qt.data).max() <= (CLIP if qt.kind == quant.INT6 else 127)
    assert qmodel["tok_emb"].dtype == "bfloat16" and qmodel["qo_bank"].dtype == "float32"
    L = tiny_cfg.num_layers
    assert report["matrices"]["qo_bank[3]"] == {"method": "gptq", "damping": pytest.approx(0.01), "fallback": False}
    assert report["matrices"][f"kv_bank[{2 * L - 1}]"] == {"method": "rows", "damping": None, "fallback": False}
    assert len(report["matrices"]) == 2 * L + 2 * L + L + L
    assert report["gptq_seconds"] > 0


def test_dequantize_round_trip(quantized_tiny, tiny_cfg):
    params, hessians, qmodel, _ = quantized_tiny
    back = quant.dequantize_params(qmodel, tiny_cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), back) == jax.tree.map(lambda x: (x.shape, x.dtype), params)
    for name, qt in qmodel.items():
        x = np.asarray(params_leaf(params, name), np.float32)
        err = np.abs(x - qt.dequantize())
        if qt.kind == quant.FP32:
            np.testing.assert_array_equal(err, 0)
        elif qt.kind == quant.FP16:
            assert np.all(err <= np.abs(x) * 2.0 ** -11 + 2.0 ** -25), name  # fp16 rounding (subnormals)
        elif qt.kind == quant.INT8:
            # Half a step, plus |q| <= 127 times the fp16-stored scale's error
            # (2^-11 of the float32 scale that divided); only values past the
            # 99.99984th percentile, at most one a row, are clipped.
            step = qt.scale.astype(np.float32)[..., None]
            assert np.mean(err <= step * (0.5 + 127 * 2.0 ** -11)) >= 1 - 1 / x.shape[-1], name
        elif name not in hessians or hessians[name] is None:
            # Row rounding: half a step wherever |w| <= 31 steps (not clamped);
            # 1e-5 for float32 rounding of w / s and q * s.
            step = qt.scale.astype(np.float32)[..., None]
            assert np.all(err[np.abs(x) <= CLIP * step] <= 0.5 * step.max() * (1 + 1e-5)), name
        else:
            # GPTQ moves weights off their nearest level to cut output error:
            # judge it by that error against row rounding's, matrix by matrix.
            q_rows, s_rows = quant._rows_int6_bank(jnp.asarray(x), CLIP)
            for i in range(x.shape[0]):
                H = hessians[name][i]
                assert recon_err_H(x[i], qt.data[i], qt.scale[i], H) < recon_err_H(x[i], q_rows[i], s_rows[i], H)
            # With a well-conditioned H the fed-back error moves each weight
            # little: measured 1.07x row rounding's weight error (itself 11-18%
            # of the weights here, the steps being the 1/31 floor).
            err_rows = x - np.asarray(q_rows, np.float32) * np.asarray(s_rows, np.float32)[..., None]
            assert np.linalg.norm(err) <= 1.5 * np.linalg.norm(err_rows), name


def test_quantize_params_without_hessians_and_bad_input(tiny_params, tiny_cfg):
    params = dict(tiny_params, smear_gate=tiny_params["smear_gate"].at[0].set(jnp.nan))
    with pytest.raises(quant.QuantError, match="smear_gate: holds NaN"):
        quant.quantize_params(params, tiny_cfg, None, QuantConfig())
    with pytest.raises(quant.QuantError, match="hessians: attn_bank: not a param"):
        quant.quantize_params(tiny_params, tiny_cfg, {"attn_bank": np.eye(4)}, QuantConfig())
    small = dataclasses.replace(tiny_cfg, num_layers=2, xsa_last_n=2, ve_layers="1")
    with pytest.raises(quant.QuantError, match=r"blocks/attn_scale: shape \(11, 128\), the config needs \(2, 128\)"):
        quant.quantize_params(tiny_params, small, None, QuantConfig())


def test_dequantize_checks_names_against_config(quantized_tiny, tiny_cfg):
    qmodel = dict(quantized_tiny[2])
    del qmodel["smear_gate"]
    with pytest.raises(quant.QuantError, match="smear_gate: missing"):
        quant.dequantize_params(qmodel, tiny_cfg)
    qmodel["smear_gate"] = qmodel["bigram/scale"]
    with pytest.raises(quant.QuantError, match="smear_gate: shape"):
        quant.dequantize_params(qmodel, tiny_cfg)
