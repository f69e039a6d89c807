"""Reference names <-> params, and reading reference weight files."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import compat, model
from golf_jax.runlog import CompileCounter
from tests.conftest import fixture_path


def ref_state(tiny_ref):
    return {k.removeprefix("param/"): v for k, v in tiny_ref.items() if k.startswith("param/")}


def test_round_trip_is_identity(tiny_ref, tiny_cfg):
    state = ref_state(tiny_ref)
    back = compat.params_to_reference(compat.params_from_reference(state, tiny_cfg), tiny_cfg)
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_state_lands_on_the_device_without_compiling(tiny_ref, tiny_cfg):
    """The stacking is the host's and the arrays are put, not converted: jnp.stack and
    jnp.asarray would each compile a program per shape, 18 of them in the reload of the
    1.0611 record's artifact at its size, beside its TTT's compilation."""
    with CompileCounter() as compiles:
        params = compat.params_from_reference(ref_state(tiny_ref), tiny_cfg)
    assert compiles.count == 0, compiles.names
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(params))


def test_layout_is_banked_and_stacked(tiny_params, tiny_cfg, tiny_ref):
    L = tiny_cfg.num_layers
    assert tiny_params["blocks"]["q_gain"].shape == (L, tiny_cfg.num_heads)
    assert tiny_params["blocks"]["resid_mix"].shape == (L, 2, tiny_cfg.model_dim)
    np.testing.assert_array_equal(tiny_params["blocks"]["attn_scale"][7], tiny_ref["param/blocks.7.attn_scale"])
    np.testing.assert_array_equal(tiny_params["ve"]["layer_scales"][1], tiny_ref["param/ve_layer_scales.1"])


def test_mismatched_state_is_an_error_naming_tensors(tiny_ref, tiny_cfg):
    state = ref_state(tiny_ref)
    missing = {k: v for k, v in state.items() if k != "smear.gate"}
    with pytest.raises(compat.CompatError, match="missing smear.gate"):
        compat.params_from_reference(missing, tiny_cfg)
    with pytest.raises(compat.CompatError, match="unexpected extra.weight"):
        compat.params_from_reference({**state, "extra.weight": np.zeros(3)}, tiny_cfg)
    bad = dict(state, **{"qo_bank": state["qo_bank"][:, :, :64]})
    with pytest.raises(compat.CompatError, match=r"qo_bank: shape \(22, 128, 64\)"):
        compat.params_from_reference(bad, tiny_cfg)


def test_npz_with_and_without_prefix(tmp_path, tiny_ref, tiny_cfg):
    state = ref_state(tiny_ref)
    np.savez(tmp_path / "plain.npz", **state)
    assert set(compat.load_reference_state(tmp_path / "plain.npz")) == set(state)
    loaded = compat.load_reference_state(fixture_path("model_tiny.npz"))
    assert set(loaded) == set(state)
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(compat.CompatError, match="junk.npz: not a readable .npz"):
        compat.load_reference_state(tmp_path / "junk.npz")
    with pytest.raises(compat.CompatError, match="not found"):
        compat.load_reference_state(tmp_path / "none.pt")


def test_reads_reference_final_model_pt(tmp_path, tiny_ref, tiny_cfg):
    """A reference state_dict as torch saves it: bf16 embeddings, fp32 rest."""
    torch = pytest.importorskip("torch")
    state = ref_state(tiny_ref)
    bf16_names = {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}
    sd = {k: torch.from_numpy(v.copy()).to(torch.bfloat16 if k in bf16_names else torch.float32)
          for k, v in state.items()}
    torch.save(sd, tmp_path / "final_model.pt")
    loaded = compat.load_reference_state(tmp_path / "final_model.pt")
    assert loaded["tok_emb.weight"].dtype == jnp.bfloat16 and loaded["qo_bank"].dtype == np.float32
    params = compat.params_from_reference(loaded, tiny_cfg)
    np.testing.assert_array_equal(np.asarray(params["tok_emb"], np.float32),
                                  sd["tok_emb.weight"].float().numpy())
    x, y = jnp.asarray(tiny_ref["x"]), jnp.asarray(tiny_ref["y"])
    loss = float(model.loss(params, tiny_cfg, x, y))
    # Embeddings rounded to bf16 move the loss a little, not a lot.
    assert abs(loss / float(tiny_ref["loss"]) - 1) < 1e-2
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(compat.CompatError, match="bad.pt: not a readable PyTorch state_dict"):
        compat.load_reference_state(tmp_path / "bad.pt")


def test_npz_of_bf16_bits(tmp_path, tiny_ref, tiny_cfg):
    """The fixtures' *_bf16bits.npz: uint16 arrays are the upper halves of float32 values."""
    ref = compat.load_reference_state(fixture_path("model_tiny.npz"))
    as_bf16 = {k: np.asarray(v, np.float32).astype(jnp.bfloat16) for k, v in ref.items()}
    np.savez(tmp_path / "w_bf16bits.npz", **{k: v.view(np.uint16) for k, v in as_bf16.items()})
    got = compat.load_reference_state(tmp_path / "w_bf16bits.npz")
    for k, v in as_bf16.items():
        assert got[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), np.asarray(v, np.float32))


def test_frontier_state_round_trips_and_lands_in_its_params(frontier_ref):
    """The 1.0611 record's state_dict names (its fixture's): each new tensor has its
    place in the params tree and comes back under its own name."""
    cfg, _, ref = frontier_ref
    state = {k.removeprefix("param/"): v for k, v in ref.items() if k.startswith("param/")}
    params = compat.params_from_reference(state, cfg)
    back = compat.params_to_reference(params, cfg)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    np.testing.assert_array_equal(params["smear"]["gate"], state["smear_gate.weight"])
    np.testing.assert_array_equal(params["smear"]["lambda"], state["smear_lambda"])
    np.testing.assert_array_equal(params["blocks"]["attn_gate_w"][3], state["blocks.3.attn.attn_gate_w"])
    for name in ("skip_gates", "parallel_resid_lambdas", "parallel_post_lambdas"):
        np.testing.assert_array_equal(params[name], state[name])
    assert "smear_gate" not in params  # the 1.1147 record's SmearGate is off
    with pytest.raises(compat.CompatError, match="missing smear_lambda"):
        compat.params_from_reference({k: v for k, v in state.items() if k != "smear_lambda"}, cfg)
