"""The 1.0611 record's quantisation (golf_jax/quant_frontier.py) against the reference's own
functions: fixtures of tests/frontier_reference/generate_quant.py, and its gptq_mixed_quantize
run here on a state with matrices above its fp16 limit."""

from __future__ import annotations

import collections
import dataclasses
import re
import types

import jax
import numpy as np
import pytest

from golf_jax import compat, hessians, param_tree, quant_frontier
from golf_jax.config import QuantConfig
from golf_jax.quant import QuantError
from tests.conftest import FRONTIER_FIXTURES, missing, reference_source

FRONTIER = "frontier_1855/train_gpt.py"
CASES = {"attn": (13.0, 31), "mlp": (11.5, 31), "emb": (14.0, 63)}  # as generate_quant.GPTQ_CASES
RECORD = QuantConfig(scheme="sdclip")  # the 1.0611 record's settings are the fields' defaults


@pytest.fixture(scope="module")
def fx() -> dict:
    path = FRONTIER_FIXTURES / "quant_frontier_tiny.npz"
    if not path.is_file():
        missing(f"{path}: not present (python tests/frontier_reference/generate_quant.py)")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def gptq_input(fx):
    X = fx["X"].astype(np.float32)
    return fx["W"].astype(np.float32), X.T @ X  # small integers: exact in float32


def test_gptq_sdclip_matches_reference(fx):
    W, H = gptq_input(fx)
    for case, (k, cr) in CASES.items():
        q, s, report = quant_frontier.gptq_sdclip(W[None], H[None], [k], cr)
        assert q.dtype == np.int8 and s.dtype == np.float16 and not report.fallback[0]
        # The same float32 algorithm: every value and scale identical.
        np.testing.assert_array_equal(q[0], fx[f"gptq/{case}/q"], err_msg=case)
        np.testing.assert_array_equal(s[0], fx[f"gptq/{case}/scale"], err_msg=case)
    assert np.abs(fx["gptq/emb/q"]).max() > 31  # int7 used


def test_gate_int8_rows_match_reference(fx):
    q, s = quant_frontier.quantize_gate_int8_rows(fx["gate/W"])
    np.testing.assert_array_equal(q, fx["gate/q"])
    np.testing.assert_array_equal(s, fx["gate/scale"])


def test_lqer_packing_matches_reference_given_its_svd(fx):
    A, B = quant_frontier.factors_from_svd(fx["lqer/U"], fx["lqer/S"], fx["lqer/Vh"], 4)
    packs = {"asym": quant_frontier.pack_lqer_asym(A, B, 64), "sym": quant_frontier.pack_lqer_sym(A, B, 4)}
    keys = {"asym": (".lqA_a", ".lqAs_a", ".lqB_a", ".lqBs_a"), "sym": (".lqA", ".lqAs", ".lqB", ".lqBs")}
    for mode, packed in packs.items():
        for ours, theirs in zip(keys[mode], ("qA", "sA", "qB", "sB")):
            np.testing.assert_array_equal(packed[ours], fx[f"lqer/{mode}/{theirs}"], err_msg=f"{mode} {theirs}")
    assert packs["asym"][".lqA_a"].min() >= -2 and packs["asym"][".lqA_a"].max() <= 1


def test_lqer_with_its_own_svd_corrects_as_well_as_the_reference(fx):
    """Our SVD (numpy's LAPACK) may pick other signs than torch's: the int2 range [-2, 1]
    is asymmetric, so its packing may differ; its error must not be larger."""
    W = fx["W"].astype(np.float32)
    E = W - fx["gptq/attn/q"].astype(np.float32) * fx["gptq/attn/scale"].astype(np.float32)[:, None]
    packed = quant_frontier.pack_lqer_asym(*quant_frontier.lqer_factors(E, 4), 64)
    correction = quant_frontier.lqer_correction({"w" + k: v for k, v in packed.items()}, "w", "+lqer_asym")
    err = np.linalg.norm(E - correction)
    assert err <= 1.001 * float(fx["lqer/recon_err"])  # the brief's ratio; equal when the signs agree
    assert err < np.linalg.norm(E)


# ----------------------------------------------------------------------------- the whole state, live

def reference_mixed_quantize():
    src = reference_source(FRONTIER, "gptq_quantize_weight", "_quantize_gate_int8_row", "_lqer_pack",
                           "_lqer_pack_asym", "gptq_mixed_quantize", "dequantize_mixed")
    import torch
    namespace = {"torch": torch, "collections": collections, "re": re, "log": lambda *a: None}
    exec(src, namespace)
    return namespace, torch


def distinct_diagonal(X: np.ndarray) -> np.ndarray:
    """Float32 X, its columns' sums of squares made distinct (first entries bumped):
    act-order sorts them, and torch's sort breaks ties its own way (generate_quant.py)."""
    X = X.copy()
    while True:
        diag = (X ** 2).sum(axis=0)
        _, first = np.unique(diag, return_index=True)
        tied = sorted(set(range(X.shape[1])) - set(first.tolist()))
        if not tied:
            return X.astype(np.float32)
        X[0, tied[0]] += 1


def mixed_state(rng):
    """Reference names: four matrices above 65,536 values (GPTQ), one below (fp16, reference
    quirk), the sparse gate, a control vector; integer activations make each H exact."""
    big = (1040, 64)
    sd = {"tok_emb.weight": rng.normal(0, 0.02, big), "blocks.0.attn.c_q.weight": rng.normal(0, 0.05, big),
          "blocks.0.mlp.fc.weight": rng.normal(0, 0.05, big), "blocks.1.mlp.fc.weight": rng.normal(0, 0.08, big),
          "blocks.0.attn.c_k.weight": rng.normal(0, 0.05, (128, 64)),
          "blocks.0.attn.attn_gate_w": rng.normal(0, 0.5, (4, 12)), "blocks.0.attn_scale": rng.normal(1, 0.1, 64)}
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    hess = {}
    for name in ("tok_emb.weight", "blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight", "blocks.1.mlp.fc.weight"):
        X = distinct_diagonal(rng.integers(-3, 4, size=(300, 64)))
        hess[name] = X.T @ X
    return sd, hess


def test_quantize_state_matches_the_references_gptq_mixed_quantize():
    ns, torch = reference_mixed_quantize()
    sd, hess = mixed_state(np.random.default_rng(0))
    h = types.SimpleNamespace(gated_attn_quant_gate=True, lqer_enabled=True, lqer_asym_enabled=True,
                              lqer_asym_group=64, lqer_top_k=3, lqer_rank=4, lqer_factor_bits=4, embed_bits=7,
                              matrix_bits=6, embed_clip_sigmas=14.0, mlp_clip_sigmas=11.5, attn_clip_sigmas=13.0,
                              matrix_clip_sigmas=12.85)
    t = {k: torch.from_numpy(v) for k, v in sd.items()}
    ref_result, ref_meta = ns["gptq_mixed_quantize"](t, {k: torch.from_numpy(v) for k, v in hess.items()}, h)
    ref_deq = {k: v.numpy() for k, v in ns["dequantize_mixed"](ref_result, ref_meta, t).items()}
    fq, report = quant_frontier.quantize_state(sd, hess, RECORD)
    assert fq.meta == ref_meta
    assert sorted(report["lqer"]) == sorted(k for k, m in ref_meta.items() if "lqer" in m)
    assert sorted(fq.arrays) == sorted(ref_result)
    for key, theirs in ref_result.items():
        if ".lq" not in key:  # LQER factors: equal up to the SVD's signs (below)
            assert fq.arrays[key].dtype == theirs.numpy().dtype, key
            np.testing.assert_array_equal(fq.arrays[key], theirs.numpy(), err_msg=key)
    ours = quant_frontier.dequantize_state(fq)
    for name, W in sd.items():
        err, ref_err = np.linalg.norm(ours[name] - W), np.linalg.norm(ref_deq[name] - W)
        assert err <= 1.001 * ref_err + 1e-7, f"{name}: {err} against the reference's {ref_err}"


def test_a_large_tensor_without_hessian_is_named():
    sd, hess = mixed_state(np.random.default_rng(1))
    del hess["blocks.0.mlp.fc.weight"]
    with pytest.raises(QuantError, match=r"blocks\.0\.mlp\.fc\.weight: 66,560 values .* no Hessian"):
        quant_frontier.quantize_state(sd, hess, RECORD)


# ----------------------------------------------------------------------------- golf_jax params

def test_params_round_trip_through_the_reference_layout(frontier_ref):
    """A tiny frontier model: Hessians as the record collects them; with the fp16 limit
    lowered to 1,024 values, the MLP banks and the embedding GPTQ'd, the attention banks
    fp16 (reference quirk); back to a params tree of the model's structure and dtypes."""
    cfg, _, ref = frontier_ref
    state = {k.removeprefix("param/"): v for k, v in ref.items() if k.startswith("param/")}
    params = param_tree.cast_params(compat.params_from_reference(state, cfg), cfg)  # tok_emb bf16, as trained
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (2, 33), 2, cfg.vocab_size))
    hess = hessians.collect_hessians(params, cfg, tokens, 2, damping=0.0, looping=True, per_batch=True,
                                     embedding=True)
    fq, report = quant_frontier.quantize_params(params, cfg, hess, dataclasses.replace(RECORD,
                                                                                       keep_float_max_numel=1024))
    L = cfg.num_layers
    assert sorted(report["matrices"]) == sorted(["tok_emb.weight"] + [f"blocks.{i}.mlp.{m}.weight" for i in range(L)
                                                                      for m in ("fc", "proj")])
    assert len(report["lqer"]) == 3 and all("lqer_asym" in fq.meta[n] for n in report["lqer"])
    assert fq.meta["tok_emb.weight"].startswith("gptq (int7)") and fq.meta["blocks.0.attn.c_q.weight"] == \
        "passthrough (float16)" and fq.meta["blocks.2.attn.attn_gate_w"] == "gate_int8_row"
    back = quant_frontier.dequantize_params(fq, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(back)):
        assert a.shape == b.shape and a.dtype == b.dtype, path
    # fp16 passthrough: the values rounded to fp16; the gate within half of its step.
    np.testing.assert_array_equal(back["qo_bank"], np.asarray(params["qo_bank"]).astype(np.float16).astype(np.float32))
    gate, gate_back = np.asarray(params["blocks"]["attn_gate_w"]), np.asarray(back["blocks"]["attn_gate_w"])
    step = fq.arrays["blocks.0.attn.attn_gate_w.gs"].astype(np.float32)[:, None]
    assert np.all(np.abs(gate[0] - gate_back[0]) <= 0.5 * step * (1 + 1e-3))  # fp16 scale: 1e-3 relative
    deq = quant_frontier.dequantize_state(fq)
    np.testing.assert_array_equal(back["mlp_up_bank"][3], deq["blocks.3.mlp.fc.weight"])
