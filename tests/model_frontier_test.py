"""The 1.0611 record's model (issue 19) against its own PyTorch code, through the
fixtures of tests/frontier_reference/generate.py (float32, CPU): a packed row of
several documents, unlooped and looped; and its initialisation, shapes and orders."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import compat, model, packing, param_tree
from golf_jax.config import ModelConfig

FRONTIER_PARAMS = 35_945_671  # SPEC.md, section 2
MODES = {"unlooped": False, "looped": True}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fixture_segments(ref) -> packing.Segments:
    """The fixture row's documents, unfolded (one fold row: the CPU's "jnp"
    attention reads only their ids)."""
    cu, total_len = ref["cu_seqlens"], ref["x"].shape[1]
    return packing.make_segments(cu, total_len, total_len, packing.segments_per_fold_needed(cu, total_len, total_len))


def fixture_inputs(ref, cfg: ModelConfig):
    """(params in cfg's layout, tokens x, targets y, segments) of the fixture's packed row."""
    params = compat.params_from_reference({k[6:]: v for k, v in ref.items() if k.startswith("param/")}, cfg)
    return params, jnp.asarray(ref["x"]), jnp.asarray(ref["y"]), fixture_segments(ref)


def gradient_errors(grads, cfg: ModelConfig, ref, mode: str) -> tuple[dict, dict, dict]:
    """(our gradients, the reference's, by its names; the relative error of each nonzero one of theirs)."""
    ours = compat.params_to_reference(grads, cfg)
    prefix = f"{mode}/grad/"
    theirs = {k.removeprefix(prefix): v for k, v in ref.items() if k.startswith(prefix)}
    return ours, theirs, {k: rel_err(ours[k], theirs[k]) for k in theirs if np.any(theirs[k])}


def loss_and_gradient_errors(cfg: ModelConfig, ref, mode: str) -> tuple[float, dict]:
    """cfg's training loss and gradients on the fixture's packed row in `mode` (MODES), one
    compiled program: (the loss's relative error against the reference's, each gradient's)."""
    params, x, y, segments = fixture_inputs(ref, cfg)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: model.loss(p, cfg, x, y, looping=MODES[mode], segments=segments)))(params)
    return abs(float(loss) / float(ref[f"{mode}/loss"]) - 1), gradient_errors(grads, cfg, ref, mode)[2]


@pytest.fixture(scope="module")
def results(frontier_ref) -> dict:
    """Loss, logits and gradients of each mode: one compiled program per mode."""
    cfg, _, ref = frontier_ref
    params, x, y, segments = fixture_inputs(ref, cfg)

    @functools.partial(jax.jit, static_argnames="looping")
    def run(params, looping):
        def loss_and_logits(p):
            z = model.logits(p, cfg, x, looping=looping, segments=segments)
            return jnp.mean(model.nll_from_logits(z, y)), z
        (loss, z), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(params)
        return loss, z, grads

    return {mode: run(params, looping) for mode, looping in MODES.items()}


@pytest.mark.parametrize("mode", MODES)
def test_loss_and_logits_match_the_reference(frontier_ref, results, mode):
    _, _, ref = frontier_ref
    loss, z, _ = results[mode]
    # float32 against float32, the sums in other orders: measured 1.2e-7 and 7e-7.
    assert abs(float(loss) / float(ref[f"{mode}/loss"]) - 1) <= 1e-5
    assert z.shape == ref[f"{mode}/logits"].shape
    assert float(jnp.max(jnp.abs(z - ref[f"{mode}/logits"]))) <= 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_every_gradient_matches_the_reference(frontier_ref, results, mode):
    cfg, _, ref = frontier_ref
    ours, theirs, errors = gradient_errors(results[mode][2], cfg, ref, mode)
    assert set(ours) == set(theirs)
    # float32 sums over the tokens in other orders: measured 1.4e-5 at most (q_gain).
    assert max(errors.values()) <= 1e-4, {k: e for k, e in errors.items() if e > 1e-4}
    for k in set(theirs) - set(errors):  # an all-zero reference gradient (e.g. unused skip weights) stays zero
        assert not np.any(ours[k]), k


def test_the_fixture_exercises_every_feature(frontier_ref):
    """What the parity tests cover: documents split into segments, the loop, the
    parallel lanes, skips left unused without the loop, every parameter non-trivial."""
    cfg, meta, ref = frontier_ref
    assert (tuple(meta["encoder_indices"]), tuple(meta["decoder_indices"])) == cfg.layer_order(looping=True)
    assert meta["num_skip_weights"] == cfg.num_skip_weights
    segments = packing.segment_ids(ref["cu_seqlens"], ref["x"].shape[1])
    bos = np.flatnonzero(ref["x"][0] == meta["bos_id"])
    assert len(np.unique(segments)) > len(bos) + 1  # a document longer than train_seq_len was split
    assert ref["x"][0, 0] != meta["bos_id"]  # the row starts inside a document
    grads, unlooped_skips = ref["unlooped/grad/skip_weights"], len(cfg.layer_order(looping=False)[0])
    assert not np.any(grads[unlooped_skips:]) and np.all(np.any(grads[:unlooped_skips], axis=1))
    assert all(np.any(ref[f"looped/grad/{k}"]) for k in ("skip_gates", "smear_gate.weight", "smear_lambda"))
    assert all(np.any(v) for k, v in ref.items() if k.startswith("param/"))


def test_record_orders_are_derived_as_the_reference_derives_them(frontier_ref):
    _, meta, _ = frontier_ref
    rec = meta["record_orders"]
    cfg = ModelConfig(num_layers=rec["num_layers"], num_loops=2, loop_start=3, loop_end=5,
                      parallel_start_layer=rec["parallel_start_layer"])
    encoder, decoder = cfg.layer_order(looping=True)
    assert (list(encoder), list(decoder)) == (rec["encoder_indices"], rec["decoder_indices"])
    assert (encoder, decoder) == ((0, 1, 2, 3, 4, 5, 3, 4), (5, 3, 4, 5, 6, 7, 8, 9, 10))  # SPEC.md
    assert cfg.num_skip_weights == rec["num_skip_weights"] == 8
    assert cfg.layer_order(looping=False) == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9, 10))
    assert [layer for layer in decoder if cfg.parallel_on(layer)] == [8, 9, 10]


# ----------------------------------------------------------------------------- the full-size model and its init

FRONTIER = dict(vocab_size=8192, mlp_mult=4.0, qk_gain_init=5.0, bigram_vocab_size=0, ve_enabled=False,
                rope_ntk_base_len=0, num_loops=2, loop_start=3, loop_end=5, skip_gates=True, parallel_start_layer=8,
                sparse_attn_gate=True, sparse_attn_gate_scale=0.5, smear_gate="windowed")


def test_frontier_param_count_and_shapes():
    cfg = ModelConfig(**FRONTIER)
    cfg.validate()
    shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))
    assert param_tree.param_count(shapes) == FRONTIER_PARAMS
    assert shapes["mlp_up_bank"].shape == (11, 2048, 512) and shapes["blocks"]["attn_gate_w"].shape == (11, 8, 12)
    assert shapes["skip_gates"].shape == shapes["skip_weights"].shape == (8, 512)
    assert shapes["parallel_resid_lambdas"].shape == (11, 2) and shapes["parallel_post_lambdas"].shape == (11, 2, 2)
    assert shapes["smear"]["gate"].shape == (1, 12) and shapes["smear"]["lambda"].shape == (1,)
    assert "bigram" not in shapes and "ve" not in shapes and "smear_gate" not in shapes
    names = set(compat.expected_shapes(cfg))
    assert {"smear_gate.weight", "smear_lambda", "skip_gates", "blocks.10.attn.attn_gate_w"} <= names


def test_init_follows_the_reference(frontier_ref):
    """Zeros where the reference zero-inits, its constants (bf16-rounded: the reference
    casts the model to bf16 and back), orthogonal banks; float32 but the embedding."""
    cfg = dataclasses.replace(frontier_ref[0], vocab_size=512)
    p = model.init_params(cfg, jax.random.key(7))
    L = cfg.num_layers
    for path, leaf in jax.tree_util.tree_leaves_with_path(p):
        name = param_tree.path_name(path)
        assert leaf.dtype == (jnp.bfloat16 if name in param_tree.EMBEDDING_KEYS else jnp.float32), name
        as_f32 = np.asarray(leaf, np.float32)
        np.testing.assert_array_equal(as_f32, np.asarray(jnp.asarray(as_f32).astype(jnp.bfloat16), np.float32),
                                      err_msg=f"{name} is not bf16-representable")
    for name in ("skip_gates", "smear/gate", "smear/lambda", "blocks/attn_gate_w"):
        section, _, key = name.rpartition("/")
        assert not np.any(np.asarray(p[section][key] if section else p[key])), name
    np.testing.assert_array_equal(p["parallel_resid_lambdas"], np.float32(jnp.bfloat16(1.1)))  # 1.1015625
    np.testing.assert_array_equal(p["parallel_post_lambdas"], 1.0)
    np.testing.assert_array_equal(p["skip_weights"], 1.0)
    np.testing.assert_array_equal(p["blocks"]["q_gain"], 5.0)
    assert not np.any(np.asarray(p["qo_bank"][L:])) and not np.any(np.asarray(p["mlp_down_bank"]))
    for w in (p["qo_bank"][4], p["kv_bank"][L + 2], p["mlp_up_bank"][6]):  # 4x MLP: a tall bank, orthonormal columns
        w = np.asarray(w, np.float64)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert np.max(np.abs(gram - np.eye(len(gram)))) < 2e-2  # bf16 rounding
    tok = np.asarray(p["tok_emb"], np.float32)
    # N(0, 0.005) over 16,384 values: the sample std within 5%, the mean within 4 standard errors.
    assert abs(tok.std() / cfg.tied_embed_init_std - 1) < 0.05
    assert abs(tok.mean()) < 4 * cfg.tied_embed_init_std / tok.size ** 0.5


def test_fresh_model_is_the_plain_stack_at_init(frontier_ref):
    """With the init's zero gates and lambdas, the windowed SmearGate and the sparse head
    gate are the identity and 0.5 respectively: at init the model equals one without the
    SmearGate whose attention outputs are halved (attn_scale 0.5)."""
    cfg = frontier_ref[0]
    p = model.init_params(cfg, jax.random.key(3))
    L = cfg.num_layers  # the zero-init out-projections would hide the attention: made non-zero
    p["qo_bank"] = p["qo_bank"].at[L:].set(0.1 * jax.random.normal(jax.random.key(4), p["qo_bank"][L:].shape))
    x = jax.random.randint(jax.random.key(5), (1, 24), 0, cfg.vocab_size)
    plain = dataclasses.replace(cfg, smear_gate="none", sparse_attn_gate=False)
    q = {k: v for k, v in p.items() if k != "smear"}
    q["blocks"] = {k: v for k, v in p["blocks"].items() if k != "attn_gate_w"}
    q["blocks"]["attn_scale"] = 0.5 * p["blocks"]["attn_scale"]
    # Halving is exact in float32; only the order of a few products differs.
    np.testing.assert_allclose(model.logits(p, cfg, x), model.logits(q, plain, x), rtol=1e-6, atol=1e-6)


def test_decode_refuses_looping_and_packed_rows(frontier_ref):
    cfg = frontier_ref[0]
    params = model.init_params(cfg, jax.random.key(0))
    x = jnp.zeros((1, 4), jnp.int32)
    for kwargs in ({"looping": True}, {"segments": packing.make_segments(np.array([0, 4]), 4, 4, 2)}):
        with pytest.raises(ValueError, match="decode=True"):
            model.GPT(cfg).apply({"params": params}, x, 8, True, method=model.GPT.hidden, mutable=["cache"], **kwargs)


def test_cached_decoding_unlooped_equals_the_full_forward(frontier_ref):
    """The KV cache with the windowed SmearGate (its previous embedding is cached), the
    head gate and the lanes: chunks of 8 against one forward of the fixture's row."""
    from golf_jax import generate
    cfg, _, ref = frontier_ref
    params = compat.params_from_reference({k[6:]: v for k, v in ref.items() if k.startswith("param/")}, cfg)
    tokens = jnp.asarray(ref["x"][:, :48])
    assert np.any(np.asarray(tokens[:, 8::8]) == 1)  # a BOS where a chunk begins: its smear stays off
    full = model.logits(params, cfg, tokens)
    cache = generate.init_cache(params, cfg, 1, 48)
    step = jax.jit(generate.forward_chunk, static_argnames=("cfg", "rope_len"))
    got = []
    for t in range(0, 48, 8):
        z, cache = step(params, cfg, cache, tokens[:, t:t + 8], rope_len=48)
        got.append(np.asarray(z))
    # float32 both ways; the cache only reorders the attention's sums (masked keys).
    np.testing.assert_allclose(np.concatenate(got, axis=1), np.asarray(full), atol=1e-5, rtol=0)


def test_bfloat16_compute_close_to_float32(frontier_ref, results):
    cfg, _, ref = frontier_ref
    bf16 = dataclasses.replace(cfg, compute_dtype="bfloat16")
    params = param_tree.cast_params(
        compat.params_from_reference({k[6:]: v for k, v in ref.items() if k.startswith("param/")}, bf16), bf16)
    x, y = jnp.asarray(ref["x"]), jnp.asarray(ref["y"])
    got = model.loss(params, bf16, x, y, looping=True, segments=fixture_segments(ref))
    assert got.dtype == jnp.float32
    # bf16 has 8 mantissa bits (~4e-3 relative per op), compounded over 11 applications.
    assert abs(float(got) / float(ref["looped/loss"]) - 1) < 2e-2
