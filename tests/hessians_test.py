"""The GPTQ Hessians against the reference's (hessians_tiny.npz), and a non-finite layer named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import hessians
from golf_jax.config import ModelConfig
from golf_jax.quant import QuantError
from tests.conftest import fixture_path


def reference_hessian_names(hess: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The reference's per-layer names (`blocks.3.attn.c_q.weight`, ...) for our banks."""
    L = cfg.num_layers
    out = {}
    for i in range(L):
        pre = f"blocks.{i}."
        out[pre + "attn.c_q.weight"] = hess["qo_bank"][i]
        out[pre + "attn.proj.weight"] = hess["qo_bank"][L + i]
        out[pre + "attn.c_k.weight"] = hess["kv_bank"][i]
        out[pre + "attn.c_v.weight"] = hess["kv_bank"][L + i]
        out[pre + "mlp.fc.weight"] = hess["mlp_up_bank"][i]
        out[pre + "mlp.proj.weight"] = hess["mlp_down_bank"][i]
    if "bigram/proj" in hess:
        out["bigram.proj.weight"] = hess["bigram/proj"]
    if "ve/proj" in hess:
        out["ve_shared.proj.weight"] = hess["ve/proj"]
    return {k: np.asarray(v) for k, v in out.items()}


def test_hessians_match_reference(tiny_params, tiny_cfg):
    with np.load(fixture_path("hessians_tiny.npz")) as z:
        ref = {k: z[k] for k in z.files}
    hess = hessians.collect_hessians(tiny_params, tiny_cfg, ref.pop("tokens"), batch_size=2)
    ours = reference_hessian_names(hess, tiny_cfg)
    assert sorted(ours) == sorted(ref)
    for name, h in ref.items():
        rel = np.linalg.norm(ours[name] - h) / np.linalg.norm(h)
        # float32 sums of 512 outer products, in another order: ~1e-7 expected
        assert rel <= 1e-4, f"{name}: relative error {rel:.2e}"
    L = tiny_cfg.num_layers
    assert hess["qo_bank"].shape == (2 * L, tiny_cfg.model_dim, tiny_cfg.model_dim)
    assert hess["mlp_down_bank"].shape == (L, tiny_cfg.mlp_dim, tiny_cfg.mlp_dim)



def test_hessian_collection_names_a_non_finite_layer(tiny_params, tiny_cfg):
    poisoned = dict(tiny_params, mlp_up_bank=tiny_params["mlp_up_bank"].at[3, 0, 0].set(jnp.inf))
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (2, 17), 0, tiny_cfg.vocab_size))
    with pytest.raises(QuantError, match=r"input of layers_3/mlp/proj \(and \d+ inputs after it\) holds NaN or inf on calibration sequences 0\.\.1"):
        hessians.collect_hessians(poisoned, tiny_cfg, tokens, batch_size=2)


def test_a_looped_layer_sums_the_grams_of_its_applications():
    """With the depth recurrence each application of a looped layer sows its input's Gram;
    the Hessian sums them, as the 1.0611 record's forward hooks accumulate every call."""
    from golf_jax import model

    cfg = ModelConfig(vocab_size=64, num_layers=3, model_dim=16, num_heads=2, num_kv_heads=1, bigram_vocab_size=0,
                      ve_enabled=False, xsa_last_n=3, rope_dims=4, num_loops=2, loop_start=1, loop_end=1,
                      compute_dtype="float32", attention_impl="jnp")
    rng = np.random.default_rng(0)  # away from the init, whose blocks (zero projections) are the identity
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.05, p.shape).astype(p.dtype),
                          model.init_params(cfg, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    _, sown = jax.jit(lambda p: model.GPT(cfg).apply({"params": p}, tokens, looping=True, method=model.GPT.hidden,
                                                     mutable=[model.INPUT_GRAMS]))(params)
    applications = sown[model.INPUT_GRAMS]["layers_1"]["attn"]["qkv"]
    assert len(applications) == 3 and len(sown[model.INPUT_GRAMS]["layers_0"]["attn"]["qkv"]) == 1
    grams = hessians._input_grams(params, cfg, tokens, looping=True)
    # float32: two programs, fused differently (measured 6e-6 against the eager forward).
    np.testing.assert_allclose(grams["layers_1/attn/qkv"], applications[0] + applications[1] + applications[2],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grams["layers_0/attn/qkv"], sown[model.INPUT_GRAMS]["layers_0"]["attn"]["qkv"][0],
                               rtol=1e-4, atol=1e-4)
    unlooped = hessians._input_grams(params, cfg, tokens)
    np.testing.assert_array_equal(unlooped["layers_0/attn/qkv"], grams["layers_0/attn/qkv"])


def test_frontier_hessians_match_reference(frontier_ref):
    """The 1.0611 record's 6L + 1 Hessians (tests/frontier_reference/generate_quant.py: its
    collect_hessians on the tiny model, looping on, a dense forward, two batches): summed
    Grams over every application of a looped layer, / the number of batches, undamped, and
    tok_emb's from the final norm's output; compared through their diagonals and probes."""
    from golf_jax import compat, quant_frontier
    from tests.conftest import FRONTIER_FIXTURES, missing

    path = FRONTIER_FIXTURES / "quant_frontier_tiny.npz"
    if not path.is_file():
        missing(f"{path}: not present (python tests/frontier_reference/generate_quant.py)")
    with np.load(path) as z:
        ref = {k: z[k] for k in z.files if k.startswith("hess/")}
    cfg, _, arrays = frontier_ref
    params = compat.params_from_reference({k.removeprefix("param/"): v for k, v in arrays.items()
                                           if k.startswith("param/")}, cfg)
    x = ref["hess/x"].reshape(-1, ref["hess/x"].shape[-1])  # [batches x sequences, T]
    tokens = np.concatenate([x, np.zeros((x.shape[0], 1), x.dtype)], axis=1)  # the inputs are tokens[:, :-1]
    hess = hessians.collect_hessians(params, cfg, tokens, batch_size=ref["hess/x"].shape[1], damping=0.0,
                                     looping=True, per_batch=True, embedding=True)
    ours = quant_frontier.reference_hessians(hess, cfg.num_layers)
    names = {k.split("/")[1] for k in ref if k.count("/") == 2}
    assert sorted(ours) == sorted(names) and len(names) == 6 * cfg.num_layers + 1
    probes = ref["hess/probes"]
    for name in names:
        H = np.asarray(ours[name], np.float64)
        for what, value in (("diag", np.diag(H)), ("probe", H @ probes[:H.shape[0]])):
            want = ref[f"hess/{name}/{what}"]
            rel = np.linalg.norm(value - want) / np.linalg.norm(want)
            # float32 forwards of two frameworks and sums of 128 outer products in another order
            assert rel <= 1e-5, f"{name} {what}: relative error {rel:.2e}"
