"""Score-first test-time training: the protocol (a chunk's score depends on
the chunks before it and never on those after it), the window bookkeeping,
the optimizer wiring, several devices, and the command line."""

from __future__ import annotations

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import data, evaluate, model, ttt
from golf_jax.config import ConfigError
from tests.conftest import run_on_cpu_devices
from tests.train_test import tiny_config

CHUNK = 512
TTT = {"eval.max_val_tokens": "3100", "eval.sliding_stride": "16", "ttt.chunk_tokens": str(CHUNK),
       "ttt.seq_len": "64", "ttt.batch_seqs": "4", "ttt.epochs": "2", "ttt.lr": "0.02"}


def ttt_config(tmp_path, **overrides):
    return tiny_config(tmp_path, **{**TTT, **overrides})


def live_params(cfg):
    """Initial weights with the zero-initialised output projections filled in:
    as initialised, attention and MLP outputs are zero and so are most gradients."""
    params = model.init_params(cfg.model, jax.random.key(1))
    for i, bank in enumerate(("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")):
        params[bank] = params[bank] + 0.02 * jax.random.normal(jax.random.key(2 + i), params[bank].shape)
    return params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = ttt_config(tmp_path_factory.mktemp("ttt"))
    tokens, tables, _ = evaluate.load_eval_data(cfg)
    return cfg, tokens, tables, live_params(cfg)


@pytest.fixture(scope="module")
def runs(setup):
    """TTT as configured, and with a learning rate of 0 (the frozen model)."""
    cfg, tokens, tables, params = setup
    frozen = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, lr=0.0))
    return (ttt.run(params, cfg, tokens, tables, progress=False),
            ttt.run(params, frozen, tokens, tables, progress=False))


def test_chunks_cover_the_sliding_windows_exactly():
    """Every scored target of the sliding plan, as many times as the plan
    scores it, lands in the chunk that holds it; windows crossing a boundary
    are split there. A stride and a chunk size that do not divide each other
    force splits; the reference's trailing quirk scores the tail repeatedly."""
    for stride, chunk, score_once in ((16, 512, False), (24, 500, False), (24, 500, True), (64, 100, False)):
        cfg = ttt_config("/unused", **{"eval.sliding_stride": str(stride), "ttt.chunk_tokens": str(chunk),
                                       "eval.sliding_score_once": str(score_once), "ttt.seq_len": "32"})
        n = 3000
        sliding = evaluate.sliding_plan(n, cfg.eval.eval_seq_len, stride, score_once)
        want = np.zeros(n, np.int64)
        for s, lo, hi in zip(sliding.starts, sliding.lo, sliding.hi):
            want[s + lo:s + hi] += 1
        plan = ttt.chunk_plan(n, cfg)
        assert len(plan.windows) == -(-n // chunk)
        got = np.zeros(n, np.int64)
        for c, w in enumerate(plan.windows):
            for s, lo, hi in zip(w.starts, w.lo, w.hi):
                assert c * chunk <= s + lo < s + hi <= (c + 1) * chunk  # inside its chunk
                assert 0 <= lo < hi <= cfg.eval.eval_seq_len
                got[s + lo:s + hi] += 1
            # Training sequences: whole sequences of the chunk's own targets.
            ts = plan.train_starts[c]
            assert np.all(ts >= c * chunk) and np.all(ts + 32 <= min((c + 1) * chunk, n))
        np.testing.assert_array_equal(got, want)


def test_zero_learning_rate_is_the_sliding_evaluation(setup, runs):
    cfg, tokens, tables, params = setup
    r = runs[1]
    sl = evaluate.run_sliding(params, cfg, tokens, tables, progress=False)
    assert (r.tokens, r.bytes) == (sl.tokens, sl.bytes) and r.train_steps == 0
    # The same per-window float32 sums, added in another order (per chunk, then
    # chunks) in float64: equal to float64 rounding of numbers ~1e4.
    assert r.loss == pytest.approx(sl.loss, rel=1e-12, abs=0)


def test_score_first_protocol(setup, runs):
    """Chunk N's score does not change when any token after chunk N changes,
    and changes when a chunk before N changes, including one too far back to be
    in any window's context: that one reaches chunk N only through training."""
    cfg, tokens, tables, params = setup
    base = runs[0]
    n_chunks = base.chunks
    assert n_chunks >= 5
    N = 3
    rng = np.random.default_rng(0)

    def altered(lo, hi):
        t = tokens.copy()
        t[lo:hi] = rng.integers(0, cfg.model.vocab_size, hi - lo)
        return ttt.run(params, cfg, t, tables, progress=False)

    # Targets of chunk N are tokens[N*C + 1 .. (N+1)*C]; everything after is the future.
    future = altered((N + 1) * CHUNK + 1, len(tokens))
    assert future.chunk_loss_sums[:N + 1] == base.chunk_loss_sums[:N + 1]  # bit for bit
    assert future.chunk_loss_sums[N + 1] != base.chunk_loss_sums[N + 1]

    # Chunk N-2's tokens are > eval_seq_len before chunk N's first target: not in any of its windows.
    assert CHUNK > cfg.eval.eval_seq_len
    past = altered((N - 2) * CHUNK + 1, (N - 1) * CHUNK - cfg.eval.eval_seq_len)
    assert past.chunk_loss_sums[:N - 2] == base.chunk_loss_sums[:N - 2]
    assert past.chunk_loss_sums[N] != base.chunk_loss_sums[N]
    # The same alteration with training off leaves chunk N alone: the path was training.
    frozen = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, lr=0.0))
    t = tokens.copy()
    t[(N - 2) * CHUNK + 1:(N - 1) * CHUNK - cfg.eval.eval_seq_len] = 7
    b = ttt.run(params, frozen, t, tables, progress=False)
    assert runs[1].chunk_loss_sums[N] == b.chunk_loss_sums[N]


def test_a_byte_sidecar_counts_the_bytes(setup, runs):
    """With a byte sidecar (data.text_transform "caseops") the chunks' losses
    are those with the byte tables and their bytes the sidecar's entries of
    the chunks' scored targets."""
    cfg, tokens, _, params = setup
    counts = np.random.default_rng(0).integers(0, 9, len(tokens))
    frozen = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, lr=0.0))
    r = ttt.run(params, frozen, tokens, data.ByteSidecar(counts, "sidecar"), progress=False, max_chunks=2)
    assert r.chunk_loss_sums == runs[1].chunk_loss_sums[:2] and r.chunk_tokens == runs[1].chunk_tokens[:2]
    windows = ttt.chunk_plan(len(tokens) - 1, cfg).windows[:2]
    assert r.chunk_bytes == [sum(int(counts[s + 1 + lo:s + 1 + hi].sum()) for s, lo, hi in zip(w.starts, w.lo, w.hi))
                             for w in windows]


def test_last_chunk_is_scored_never_trained(setup, runs):
    cfg, tokens, tables, params = setup
    r, frozen = runs
    plan = ttt.chunk_plan(len(tokens) - 1, cfg)
    bs = min(cfg.ttt.batch_seqs, len(plan.train_starts[0]))
    expected = sum(-(-len(ts) // bs) for ts in plan.train_starts[:-1]) * cfg.ttt.epochs
    assert r.train_steps == expected > 0
    assert r.chunk_tokens[-1] > 0  # the last chunk is scored
    # Adaptation helps on text: the training pays for itself on the chunks after the first.
    assert r.chunk_loss_sums[0] == frozen.chunk_loss_sums[0]
    assert r.loss < frozen.loss


def test_cosine_learning_rate_across_chunks():
    t = ttt_config("/unused").ttt
    rates = [ttt.chunk_lr(t, c, 5) for c in range(5)]
    assert rates[0] == t.lr and rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert rates[2] == pytest.approx(t.lr / 2)
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_sgd_matches_torch_momentum_and_clip():
    """One step by hand: g clipped to norm 1, buf = 0.9 buf + g, p -= lr buf."""
    t = ttt_config("/unused").ttt
    tx = ttt.build_optimizer(t)
    p = {"w": jnp.array([1.0, 2.0])}
    g1, g2 = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.1, -0.2])}
    state = tx.init(p)
    u1, state = tx.update(g1, state, p)
    u2, state = tx.update(g2, state, p)
    c1 = np.array([3.0, 4.0]) / 5.0  # norm 5 clipped to 1
    buf2 = t.momentum * c1 + np.array([0.1, -0.2])  # norm < 1: not clipped
    np.testing.assert_allclose(np.asarray(u1["w"]), -c1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u2["w"]), -buf2, rtol=1e-6)


def test_frozen_blocks_stay_fixed(setup):
    cfg, tokens, tables, params = setup
    cfg = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, freeze_blocks=1))
    mask = ttt.trainable_mask(params, cfg)
    tx, step = ttt.train_step_for(cfg.model, cfg.ttt)
    before = jax.tree.map(np.asarray, params)
    x = jnp.asarray(tokens[:4 * 64].reshape(4, 64))
    y = jnp.asarray(tokens[1:4 * 64 + 1].reshape(4, 64))
    copy = jax.tree.map(lambda a: jnp.array(a, copy=True), params)
    opt = tx.init(jax.tree.map(lambda a: a.astype(jnp.float32), copy))
    after, _, _ = step(copy, opt, x, y, jnp.ones(4), jnp.float32(0.1), mask)
    after = jax.tree.map(np.asarray, after)
    L = cfg.model.num_layers
    for bank in ("qo_bank", "kv_bank", "mlp_up_bank"):
        for layer, trained in ((0, False), (1, True)):
            rows = [layer, L + layer] if before[bank].shape[0] == 2 * L else [layer]
            assert np.array_equal(after[bank][rows], before[bank][rows]) != trained, (bank, layer)
    np.testing.assert_array_equal(after["blocks"]["attn_scale"][0], before["blocks"]["attn_scale"][0])
    assert not np.array_equal(after["tok_emb"], before["tok_emb"])  # outside the blocks: trained


def test_adamw_variant_runs_and_differs(setup, runs):
    cfg, tokens, tables, params = setup
    adam = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, optimizer="adamw", lr=1e-4, momentum=0.9,
                                                            weight_decay=0.01))
    a = ttt.run(params, adam, tokens, tables, progress=False, max_chunks=3)
    s = runs[0]
    assert a.chunks == 3 and np.isfinite(a.loss)  # max_chunks: a slice of the set
    assert a.chunk_loss_sums[0] == s.chunk_loss_sums[0] and a.chunk_loss_sums[2] != s.chunk_loss_sums[2]


@pytest.mark.parametrize("field, value", [("ttt.optimizer", "lion"), ("ttt.chunk_tokens", "0"),
                                          ("ttt.seq_len", "100000"), ("ttt.freeze_blocks", "9"),
                                          ("ttt.batch_seqs", "0")])
def test_bad_ttt_config_names_the_field(tmp_path, field, value):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ttt_config(tmp_path, **{field: value})


TWO_DEVICES = textwrap.dedent("""
    import sys, json, dataclasses
    import jax
    sys.path.insert(0, sys.argv[1])
    from tests.ttt_test import live_params, ttt_config
    from golf_jax import evaluate, ttt
    out = {}
    for n in (1, 2):
        cfg = ttt_config(sys.argv[2], **{"run.num_devices": str(n), "model.embedding_dtype": "float32"})
        tokens, tables, _ = evaluate.load_eval_data(cfg)
        r = ttt.run(live_params(cfg), cfg, tokens, tables, progress=False, max_chunks=4)
        out[n] = r.chunk_loss_sums
    json.dump(out, sys.stdout)
""")


def test_two_devices_agree(tmp_path):
    """Windows and training sequences split over two devices: the same scores
    up to the order of float32 sums (gradient all-reduce, split batches)."""
    out = run_on_cpu_devices(TWO_DEVICES, str(tmp_path), timeout=600)
    assert out["1"][0] == pytest.approx(out["2"][0], rel=1e-6)  # frozen model: per-window sums, 1e-6 of fp32
    # After training on three chunks, float32 reduction-order noise in the
    # gradients (~1e-7 relative) moves the scores by far less than 1e-4.
    np.testing.assert_allclose(out["1"], out["2"], rtol=1e-4)


def test_scoring_reuses_the_sliding_evaluation_and_a_second_run_compiles_nothing(setup):
    from golf_jax.runlog import CompileCounter

    cfg, tokens, tables, params = setup
    evaluate.run_sliding(params, cfg, tokens, tables, progress=False)
    frozen = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, lr=0.0))
    with CompileCounter() as scoring:  # as in the pipeline: TTT right after the sliding evaluation
        ttt.run(params, frozen, tokens, tables, progress=False, max_chunks=2)
    ttt.run(params, cfg, tokens, tables, progress=False, max_chunks=2)
    with CompileCounter() as again:
        ttt.run(params, cfg, tokens, tables, progress=False, max_chunks=2)
    assert scoring.count == 0 and again.count == 0
