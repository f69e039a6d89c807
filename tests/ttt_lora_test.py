"""The 1.0611 record's phased score-first LoRA TTT (golf_jax/ttt_lora.py): every
chunk's score against the reference's own eval_val_ttt_phased (the fixture of
tests/frontier_reference/generate_ttt.py, float32 on the CPU), the protocol
(nothing already scored depends on a later token), the document plan, and the
model's LoRA path (no adapter: the plain model)."""

from __future__ import annotations

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import cli, compat, data, layers, model, ttt_lora, ttt_schedule
from golf_jax.config import Config, EvalConfig, TTTConfig
from golf_jax.runlog import CompileCounter
from golf_jax.train_step import make_mesh
from tests.conftest import FRONTIER_FIXTURES, REPO, missing, run_on_cpu_devices
from tests.frontier_reference import generate_ttt


@pytest.fixture(scope="module")
def fixture(frontier_ref):
    """(config, params, tokens, byte sidecar, the reference's arrays, init_a)."""
    return load_fixture(frontier_ref)


def load_fixture(frontier_ref):
    """The `fixture`, for a test's subprocess (several devices)."""
    path = FRONTIER_FIXTURES / "ttt_lora_tiny.npz"
    if not path.is_file():
        missing(f"{path} not present (python tests/frontier_reference/generate_ttt.py)")
    with np.load(path) as z:
        ref = {k: z[k] for k in z.files}
    env = dict(zip(ref["env_names"].tolist(), ref["env_values"].tolist()))
    mcfg, _, model_ref = frontier_ref
    ttt = TTTConfig(mode="lora_phased", lora_rank=int(env["TTT_LORA_RANK"]), lora_alpha=float(env["TTT_LORA_ALPHA"]),
                    lora_lr=float(env["TTT_LORA_LR"]), lora_beta2=float(env["TTT_BETA2"]),
                    lora_weight_decay=float(env["TTT_WEIGHT_DECAY"]), lora_chunk_tokens=int(env["TTT_CHUNK_SIZE"]),
                    lora_context_len=int(env["TTT_EVAL_SEQ_LEN"]), lora_batch_docs=int(env["TTT_BATCH_SIZE"]),
                    phased_prefix_docs=int(env["PHASED_TTT_PREFIX_DOCS"]),
                    phased_num_phases=int(env["PHASED_TTT_NUM_PHASES"]), global_lr=float(env["GLOBAL_TTT_LR"]),
                    global_chunk_tokens=int(env["GLOBAL_TTT_CHUNK_TOKENS"]),
                    lora_min_window=int(env["TTT_EVAL_SEQ_LEN"]))  # one program for every chunk: seconds less
    cfg = Config(model=mcfg, eval=EvalConfig(eval_seq_len=int(env["EVAL_SEQ_LEN"])), ttt=ttt)
    cfg.ttt.validate(cfg.eval.eval_seq_len, mcfg.num_layers)
    params = compat.params_from_reference({k[6:]: v for k, v in model_ref.items() if k.startswith("param/")}, mcfg)
    tables = data.ByteSidecar(ref["val_bytes"], "fixture")
    return cfg, params, ref["tokens"], tables, ref, fixture_init_a(mcfg, ttt.lora_rank)


def fixture_init_a(mcfg, rank: int) -> ttt_lora.InitA:
    """The generator's A factors (`generate_ttt.lora_a`) in model.LoRA's layout."""
    def init(construction: int, rows: int) -> dict:
        shapes = ttt_lora.lora_shapes(mcfg, rows, rank)
        out = {}
        for ti, target in enumerate(generate_ttt.LORA_TARGETS):
            slots, *row_shape = shapes[target][0]
            out[target] = np.stack([generate_ttt.lora_a(construction, ti, s, tuple(row_shape), mcfg.model_dim)
                                    for s in range(slots)])
        out["head"] = generate_ttt.lora_a(construction, generate_ttt.HEAD, 0, shapes["head"][0], mcfg.model_dim)
        return out
    return init


@pytest.fixture(scope="module")
def result(fixture):
    cfg, params, tokens, tables, _, init_a = fixture
    return ttt_lora.run(params, cfg, tokens, tables, init_a=init_a, progress=False)


def test_every_chunk_matches_the_reference(fixture, result):
    """Each scored chunk's loss, row by row, through both phases of global SGD
    (the last two batches are scored after them) and the partial batch's LoRA."""
    _, _, _, _, ref, _ = fixture
    assert len(result.chunk_row_sums) == len(ref["chunk_rows"])
    got, want = np.stack(result.chunk_row_sums), ref["chunk_rows"]
    assert np.array_equal(got == 0, want == 0)  # the same rows scored at every chunk
    # float32 against float32, sums in other orders, through up to 8 AdamW steps and 5 SGD steps
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
    assert rel.max() <= 1e-5, rel.max()
    np.testing.assert_array_equal(result.chunk_tokens, ref["chunk_tokens"])
    np.testing.assert_array_equal(result.chunk_bytes, ref["chunk_bytes"])
    assert result.phases == 2
    assert abs(result.loss / float(ref["loss"]) - 1) <= 1e-6 and abs(result.bpb / float(ref["bpb"]) - 1) <= 1e-6


# ----------------------------------------------------------------------------- the protocol

TWO_DEVICES = textwrap.dedent(r"""
    import sys, json, dataclasses, re
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from golf_jax import ttt_lora
    from golf_jax.runlog import CompileCounter
    from tests.conftest import load_frontier_ref
    from tests.ttt_lora_test import load_fixture
    cfg, params, tokens, tables, _, init_a = load_fixture(load_frontier_ref())
    # the phases' batches whole on each device: one device's scores (the split is checked below);
    # compacted batches on one row a device
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, num_devices=2),
                              ttt=dataclasses.replace(cfg.ttt, global_data_parallel=False, lora_compact_rows=2))
    first_calls = {}  # each program's (the batches' 4 rows, the compacted 2) first call
    step_for = ttt_lora.chunk_step_for

    def recording_step_for(mcfg, t):
        step = step_for(mcfg, t)
        def record(*args):
            if args[3].shape not in first_calls:  # abstract: the step donates its LoRA and optimizer state
                first_calls[args[3].shape] = (step, jax.tree.map(
                    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                    if isinstance(a, jax.Array) else a, args))
            return step(*args)
        record.lower = step.lower  # compile_ahead's: then every call must find its program compiled
        return record

    ttt_lora.chunk_step_for = recording_step_for
    with CompileCounter() as compiles:
        r = ttt_lora.run(params, cfg, tokens, tables, init_a=init_a, progress=False)
    collectives, specs = [], set()
    for step, args in first_calls.values():
        specs.add((str(args[1].factors["q"][0].sharding.spec), str(args[3].sharding.spec)))
        hlo = step.lower(*args).compile().as_text()
        collectives += re.findall(r"(?:all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(",
                                  hlo)
    (lora_spec, x_spec), = specs

    # One global step on 3 sequences split over the 2 devices (1 and 2 sequences, padded),
    # compiled by compile_ahead (so the phase's placement is the one it compiled: no compilation
    # after it), against the reference's 2 ranks written out: each rank's own packed row and mean
    # loss, their gradients averaged, clipped (the first step's momentum is that gradient).
    import jax.numpy as jnp
    from golf_jax import model, packing
    from golf_jax.train_step import make_mesh
    seq, stream, bos = cfg.eval.eval_seq_len, np.asarray(tokens[:3 * 16 + 1], np.int32), cfg.model.bos_id
    split_cfg = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, global_data_parallel=True,
                                                                 global_chunk_tokens=3 * seq))
    place = ttt_lora.RowPlacement(make_mesh(2, local=True), cfg.ttt.lora_batch_docs)
    p = place.replicated(jax.tree.map(lambda v: jnp.array(v, copy=True), params))
    m = place.replicated(jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), params))
    lora = place.factors(ttt_lora.fresh_lora(init_a(0, cfg.ttt.lora_batch_docs), cfg.model, cfg.ttt))
    ttt_lora.compile_ahead(p, split_cfg, lora, [], place, [place.global_batch(stream, 0, 3, split_cfg)])
    with CompileCounter() as late:
        _, split = ttt_lora.global_step_for(cfg.model, split_cfg.ttt, place.mesh)(
            p, m, *place.global_batch(stream, 0, 3, split_cfg), jnp.float32(1e-3))
    ranks = []
    for a, b in ((0, seq), (seq, 3 * seq)):
        x, y = stream[a:b][None], stream[a + 1:b + 1][None]
        cu, _ = packing.document_segments(np.flatnonzero(x[0] == bos), b - a, seq)
        seg = packing.make_segments(cu, b - a, seq, cfg.data.segments_per_fold)
        ranks.append(jax.grad(model.loss)(params, cfg.model, x, y, looping=cfg.model.looping_after_training,
                                          segments=seg))
    # the average, its norm and the clip on the host: numpy, not a program per leaf
    g = [(np.asarray(u, np.float64) + np.asarray(v, np.float64)) / 2 for u, v in zip(*map(jax.tree.leaves, ranks))]
    norm = np.sqrt(sum(np.sum(v * v) for v in g))
    g = [v * min(cfg.ttt.global_grad_clip / (norm + 1e-6), 1.0) for v in g]
    rel = max(float(np.max(np.abs(np.asarray(u, np.float64) - v)) / np.max(np.abs(v)))
              for u, v in zip(jax.tree.leaves(split), g))
    json.dump({"rows": np.stack(r.chunk_row_sums).tolist(), "tokens": r.chunk_tokens, "bytes": r.chunk_bytes,
               "phases": r.phases, "lora_spec": lora_spec, "x_spec": x_spec, "programs": len(first_calls),
               "collectives": collectives, "compiles": compiles.names, "split_step_rel": rel,
               "split_step_late_compiles": late.names["jit(global_sgd_step)"]}, sys.stdout)
""")


def test_batch_rows_split_over_two_devices(fixture, result):
    """run.num_devices=2: each device scores and trains half of a batch's rows
    (their inputs, LoRA factors and moments split, weights replicated), with no
    collective at all (rows are independent), each program compiled once; every chunk's
    score as the reference's, as on one device (float32, sums in other orders: the same
    1e-5 as one device's). With lora_compact_rows=2: a compacted batch's two rows, one a
    device."""
    _, _, _, _, ref, _ = fixture
    out = run_on_cpu_devices(TWO_DEVICES)
    assert out["lora_spec"].endswith(("None, 'data')", "None, 'data', None, None)")) and "'data'" in out["x_spec"]
    assert out["programs"] == 2 and out["collectives"] == []  # in either program
    # every array placed before its first call: one program each (the batches' 4 rows and the compacted 2)
    assert out["compiles"]["jit(lora_chunk_step)"] == 2 and out["compiles"]["jit(global_sgd_step)"] == 1
    got, want = np.asarray(out["rows"]), ref["chunk_rows"]
    assert np.array_equal(got == 0, want == 0)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
    assert rel.max() <= 1e-5, rel.max()
    one = np.stack(result.chunk_row_sums)
    assert (np.abs(got - one) / np.maximum(np.abs(one), 1e-30)).max() <= 1e-5
    assert out["tokens"] == result.chunk_tokens and out["bytes"] == result.chunk_bytes and out["phases"] == 2
    # global_data_parallel: the split step is the reference's two ranks' (float32, sums in other orders)
    assert out["split_step_rel"] <= 1e-5, out["split_step_rel"]
    assert out["split_step_late_compiles"] == 0


def test_a_compacted_batch_hands_on_the_whole_batchs_lora(fixture):
    """ttt.lora_compact_rows=3 of the batches' 4 rows, on the full batch of 23-40 targets
    (chunks of 8: 3, 4, 5 and 5 chunks): its last two chunks run on its 3 longest rows,
    the first row left out of one AdamW step (chunk 3's; chunk 4 trains no row). At the
    batch's end that row takes the step it sat out (a zero gradient: weight decay alone),
    so the LoRA handed on (the next batch's warm A) and every score are the whole batch's."""
    cfg, params, tokens, tables, _, init_a = fixture
    compact_t = dataclasses.replace(cfg.ttt, lora_compact_rows=3)
    starts, lengths = ttt_schedule.find_documents(tokens, cfg.model.bos_id)
    _, docs = ttt_schedule.batch_order(lengths, 4)[1]
    assert (lengths[docs] - 1).tolist() == [23, 28, 34, 40]
    assert ttt_schedule.compact_from(lengths[docs] - 1, compact_t) == (3, 1)  # (chunk, first row)
    place = ttt_lora.RowPlacement(make_mesh(1, local=True), 4, 3)
    step = ttt_lora.chunk_step_for(cfg.model, compact_t)
    assert step is ttt_lora.chunk_step_for(cfg.model, cfg.ttt)  # the module's runs' programs: compaction is _score_batch's
    cum_bytes = np.concatenate([[0], np.cumsum(tables.target_bytes(tokens))])
    loras, logs = [], []
    for t in (cfg.ttt, compact_t):
        logs.append({"chunk_row_sums": [], "chunk_tokens": [], "chunk_bytes": [], "positions": 0})
        loras.append(ttt_lora._score_batch(params, ttt_lora.fresh_lora(init_a(0, 4), cfg.model, t), tokens,
                                           cum_bytes, (starts[docs], lengths[docs]), t, step, logs[-1], place))
    assert logs[1]["positions"] == logs[0]["positions"] - 2 * 32 and logs[1]["chunk_tokens"] == logs[0]["chunk_tokens"]
    got, want = np.stack(logs[1]["chunk_row_sums"]), np.stack(logs[0]["chunk_row_sums"])
    # 3-row programs sum in other orders than 4-row ones (XLA's kernels follow the shapes):
    # float32 rounding, ~1e-7 of the scores, and of the trained rows' factors through their
    # AdamW steps up to 2e-6 of a factor's largest entry; the left-out row without its step
    # would be off by its weight decay, 0.5 x the fixture's lr 0.01 = 5e-3 of each entry
    assert np.array_equal(got == 0, want == 0) and np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30)) <= 1e-6
    for x, w in zip(jax.tree.leaves(loras[1].factors), jax.tree.leaves(loras[0].factors)):  # every A and B
        assert np.max(np.abs(np.asarray(x) - np.asarray(w))) <= 1e-5 * np.max(np.abs(np.asarray(w)))


def test_windows_padded_to_other_widths_score_as_the_reference(fixture):
    """ttt.lora_window_widths "8,24,32": the queue's first batch (before any phase) scored in
    windows of 8, 24 (not a power of two) and 32 tokens, three programs, where the module's
    runs take one of 32: every chunk as the reference's (causal attention: padding changes
    no score)."""
    cfg, params, tokens, tables, ref, init_a = fixture
    t = dataclasses.replace(cfg.ttt, lora_min_window=0, lora_window_widths="8,24,32")
    t.validate(cfg.eval.eval_seq_len, cfg.model.num_layers)
    docs, chunks = batch_chunk_ranges(cfg, tokens)[0]
    assert [ttt_schedule.chunk_window(ci, t) for ci in range(len(chunks))][:5] == [8, 24, 24, 32, 32]
    starts, lengths = ttt_schedule.find_documents(tokens, cfg.model.bos_id)
    cum_bytes = np.concatenate([[0], np.cumsum(tables.target_bytes(tokens))])
    # the run's LoRA for it: a partial batch's own (the second built), else the first, B zero
    lora = ttt_lora.fresh_lora(init_a(int(len(docs) < t.lora_batch_docs), len(docs)), cfg.model, t)
    log = {"chunk_row_sums": [], "chunk_tokens": [], "chunk_bytes": [], "positions": 0}
    ttt_lora._score_batch(params, lora, tokens, cum_bytes, (starts[docs], lengths[docs]), t,
                          ttt_lora.chunk_step_for(cfg.model, t), log, ttt_lora.RowPlacement(make_mesh(1, local=True), 4))
    got, want = np.stack(log["chunk_row_sums"]), ref["chunk_rows"][chunks.start:chunks.stop]
    assert np.array_equal(got == 0, want == 0)
    # float32 against float32 through up to 4 AdamW steps, as test_every_chunk_matches_the_reference
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30)) <= 1e-5


@pytest.mark.gpu
def test_padded_windows_score_alike_on_the_gpu():
    """configs/frontier.py's chunk step at record size (its kernels, bf16), 8 rows whose chunk
    ends 1,500 tokens in, two steps in a window of 1,536 tokens (not a power of two) and of
    2,048: the same scores, the padding past the chunk being masked by causality."""
    cfg = cli.load_config_file(str(REPO / "configs" / "frontier.py"))
    t, rows, end = dataclasses.replace(cfg.ttt, lora_batch_docs=8), 8, 1500
    C = t.lora_chunk_tokens
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    # init_params zeroes the blocks' output projections: perturbed, every block adds to the stream
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(next(keys), p.shape, p.dtype)
                          if jnp.issubdtype(p.dtype, jnp.floating) and p.ndim >= 2 else p,
                          model.init_params(cfg.model, jax.random.key(0)))
    tokens = np.random.default_rng(0).integers(2, cfg.model.vocab_size, (rows, end + 1)).astype(np.int32)
    lora = ttt_lora.fresh_lora(ttt_lora.random_init_a(cfg.model, t.lora_rank, 0)(0, rows), cfg.model, t)
    step = ttt_lora.chunk_step_for(cfg.model, t)
    scores = {}
    for width in (1536, 2048):
        x, y = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
        x[:, :end], y[:, :end] = tokens[:, :end], tokens[:, 1:]
        adapters = jax.tree.map(jnp.copy, lora)  # the step donates it
        state, sums = ttt_lora.lora_optimizer(t).init(adapters), []
        for _ in range(2):  # the second scored with the first's AdamW step taken
            adapters, state, row_sums = step(params, adapters, state, x, y, np.full(rows, end - C, np.int32),
                                             np.full(rows, end, np.int32), np.int32(end - C),
                                             np.ones(rows, np.float32), np.bool_(True))
            sums.append(np.asarray(row_sums))
        scores[width] = np.stack(sums)
    rel = np.max(np.abs(scores[1536] - scores[2048]) / np.abs(scores[2048]))
    # bf16 activations through 17 layer applications, kernels tiled otherwise at another width:
    # each row's 48 losses summed, at most a bf16 rounding (2^-8) apart
    assert rel < 4e-3, (rel, scores)


def batch_chunk_ranges(cfg, tokens) -> list[tuple[np.ndarray, range]]:
    """Each batch's documents (processing order) and its steps' indices in chunk_row_sums."""
    starts, lengths = ttt_schedule.find_documents(tokens, cfg.model.bos_id)
    out, at = [], 0
    for _, docs in ttt_schedule.batch_order(lengths, cfg.ttt.lora_batch_docs):
        n = -(-(int(lengths[docs].max()) - 1) // cfg.ttt.lora_chunk_tokens)
        out.append((docs, range(at, at + n)))
        at += n
    return out


def test_score_first_protocol(fixture, result):
    """A document's chunk N does not change when its tokens after chunk N change, nor
    does anything scored before; it changes when its chunk 0 changes although chunk 0
    lies outside chunk N's window (through the LoRA's training only). Changing a
    document of the last batch changes nothing scored before that batch."""
    cfg, params, tokens, tables, _, init_a = fixture
    starts, lengths = ttt_schedule.find_documents(tokens, cfg.model.bos_id)
    ranges = batch_chunk_ranges(cfg, tokens)
    (docs, steps), (last_docs, last_steps) = ranges[0], ranges[-1]
    row = int(np.argmax(lengths[docs]))
    doc, C, N = docs[row], cfg.ttt.lora_chunk_tokens, 5
    assert (N + 1) * C + 1 < lengths[doc] - 1 and (N + 1) * C - cfg.ttt.lora_context_len > C  # chunk 0 outside the window
    rng = np.random.default_rng(0)

    def altered(lo, hi):
        t = tokens.copy()
        t[lo:hi] = rng.integers(cfg.model.bos_id + 1, cfg.model.vocab_size, hi - lo)  # no new documents
        return ttt_lora.run(params, cfg, t, tables, init_a=init_a, progress=False).chunk_row_sums

    base = result.chunk_row_sums
    future = altered(starts[doc] + (N + 1) * C + 1, starts[doc] + lengths[doc] - 1)  # keep the next BOS
    for i in steps[:N + 1]:
        np.testing.assert_array_equal(future[i], base[i])  # bit for bit
    assert future[steps[N + 1]][row] != base[steps[N + 1]][row]
    past = altered(starts[doc] + 1, starts[doc] + C + 1)  # chunk 0's targets
    assert past[steps[N]][row] != base[steps[N]][row]
    late = altered(starts[last_docs[0]] + 1, starts[last_docs[0]] + lengths[last_docs[0]] - 1)
    for i in range(last_steps.start):
        np.testing.assert_array_equal(late[i], base[i])
    assert any(np.any(late[i] != base[i]) for i in last_steps)


# ----------------------------------------------------------------------------- the plan


def test_programs_compiled_ahead_are_the_ones_the_run_calls(fixture):
    """After `precompile` (the weights' shapes alone: the quantize pipeline runs it beside
    the artifact's reload), the batches and the phases compile nothing at all: neither
    step (a learning rate of its own: programs not compiled by the module's other runs),
    nor the copy of the weights, a partial batch's A factors, or a compacted batch's
    window and rejoining (each a compilation on the evaluation's critical path). With
    one segment slot per fold, the phases' batches need more, as rows of many short
    documents do (a program of each kind: `ttt_schedule.global_batch_rows`)."""
    cfg, params, tokens, tables, _, _ = fixture
    cfg = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, lora_lr=2 * cfg.ttt.lora_lr, lora_compact_rows=2),
                              data=dataclasses.replace(cfg.data, segments_per_fold=1))
    jax.clear_caches()  # what precompile compiles, whatever the module's other tests compiled (the persistent
    # cache then serves it, and CompileCounter counts it)
    with CompileCounter() as ahead:
        assert ttt_lora.precompile(jax.tree.map(np.zeros_like, params), cfg, tokens) > 0
    with CompileCounter() as during:  # run's own A factors (the fixture's come from numpy)
        r = ttt_lora.run(params, cfg, tokens, tables, progress=False, ahead=False)
    assert ahead.names["jit(lora_chunk_step)"] == 2  # 4 rows and 2
    assert ahead.names["jit(global_sgd_step)"] == 2  # 2 and 4 slots per fold
    assert ahead.names["jit(rejoin)"] == 1 and ahead.names["jit(copy_tree)"] == 1
    assert during.count == 0, during.names
    assert r.phases == 2 and r.compilations == 0 and r.compile_ahead_seconds == 0


def test_adapters_must_cover_every_layer_application(fixture):
    """The looped model applies 11 layers here: adapters for the 7 unlooped ones are refused."""
    cfg, params, *_ = fixture
    unlooped = len(sum(cfg.model.layer_order(False), ()))
    shapes = ttt_lora.lora_shapes(cfg.model, 1, 2)
    factors = {t: (jnp.zeros((unlooped, *a[1:])), jnp.zeros((unlooped, *b[1:]))) if t != "head" else
               (jnp.zeros(a), jnp.zeros(b)) for t, (a, b) in shapes.items()}
    x = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="layer applications"):
        jax.eval_shape(lambda p: model.lora_token_nll(p, cfg.model, x, x, model.LoRA(factors, 1.0), looping=True),
                       params)


def test_defaults_are_the_records_settings():
    """SPEC.md section 5 and its table of the record's environment overrides."""
    t = TTTConfig()
    assert t.mode == "global"  # the 1.1147 record's TTT stays the default
    assert (t.lora_rank, t.lora_alpha, t.lora_lr, t.lora_beta1, t.lora_beta2, t.lora_eps, t.lora_weight_decay) == \
        (80, 144.0, 1e-4, 0.0, 0.99, 1e-10, 0.5)
    assert (t.lora_chunk_tokens, t.lora_context_len, t.lora_batch_docs) == (48, 2048, 64)
    assert [t.phased_prefix_docs * (k + 1) // t.phased_num_phases for k in range(t.phased_num_phases)] == \
        [833, 1666, 2500]
    assert (t.global_lr, t.global_momentum, t.global_chunk_tokens, t.global_batch_seqs, t.global_grad_clip) == \
        (1e-3, 0.9, 32_768, 32, 1.0)


def test_rows_that_cannot_be_split_evenly_are_refused():
    two_devices = type("Mesh", (), {"size": 2})()
    with pytest.raises(ValueError, match=r"lora_batch_docs=3 rows cannot be split over 2 devices"):
        ttt_lora.RowPlacement(two_devices, 3)
    assert ttt_lora.RowPlacement(two_devices, 4).mesh is two_devices
    with pytest.raises(ValueError, match=r"lora_compact_rows=1 rows cannot be split over 2 devices"):
        ttt_lora.RowPlacement(two_devices, 4, 1)


def test_ranks_keep_lora_chains_of_their_own(fixture):
    """ttt.lora_ranks=3, phases off: each rank's batches (rank 0 the partial one, rank 2
    the cheapest first, then the last) scored with its own warm A and its own
    constructions, as one rank alone."""
    cfg, params, tokens, tables, _, init_a = fixture
    t3 = dataclasses.replace(cfg.ttt, lora_ranks=3, phased_prefix_docs=0)
    r = ttt_lora.run(params, dataclasses.replace(cfg, ttt=t3), tokens, tables, init_a=init_a, progress=False)
    starts, lengths = ttt_schedule.find_documents(tokens, cfg.model.bos_id)
    (era,) = ttt_schedule.rank_schedule(lengths, t3, 3).eras
    assert [[len(docs) for _, docs in batches] for batches in era] == [[2], [4], [4, 4]]
    place = ttt_lora.RowPlacement(make_mesh(1, local=True), t3.lora_batch_docs)
    step = ttt_lora.chunk_step_for(cfg.model, t3)
    cum_bytes = np.concatenate([[0], np.cumsum(tables.target_bytes(tokens))])
    log = {"chunk_row_sums": [], "chunk_tokens": [], "chunk_bytes": [], "positions": 0}
    for batches in era:
        warm, built = ttt_lora.fresh_lora(init_a(0, t3.lora_batch_docs), cfg.model, t3), 1
        for _, docs in batches:
            if len(docs) == t3.lora_batch_docs:
                lora = warm.replace(factors={k: (a, jnp.zeros_like(b)) for k, (a, b) in warm.factors.items()})
            else:  # the partial batch: the rank's next construction; its warm A waits
                lora, built = ttt_lora.fresh_lora(init_a(built, len(docs)), cfg.model, t3), built + 1
            lora = ttt_lora._score_batch(params, lora, tokens, cum_bytes, (starts[docs], lengths[docs]), t3, step,
                                         log, place)
            warm = lora if len(docs) == t3.lora_batch_docs else warm
    np.testing.assert_array_equal(np.stack(r.chunk_row_sums), np.stack(log["chunk_row_sums"]))  # the same programs
    assert r.chunk_tokens == log["chunk_tokens"] and sum(r.chunk_tokens) == int(np.sum(lengths - 1))


def test_attention_adapters_share_one_matmul():
    """blocks.SlotLoRA.attention_deltas (q, k, v and o's x A^T as one matmul) gives each
    target's own delta (float32; the same sums, tiled otherwise: 1e-6), at the query
    positions too."""
    from golf_jax.blocks import SlotLoRA
    rng = np.random.default_rng(0)
    pair = lambda out: (rng.standard_normal((2, 4, 16)), rng.standard_normal((2, out, 4)))  # noqa: E731
    slot = SlotLoRA(*(tuple(jnp.asarray(m, jnp.float32) for m in pair(o)) for o in (16, 8, 8, 16, 16)), 1.8)
    h = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    joint = slot.attention_deltas(h)
    for target in ("q", "k", "v", "o"):
        np.testing.assert_allclose(joint[target], slot.delta(target, h), rtol=1e-6, atol=1e-6)
    last = slot.attention_deltas(h, queries=(3, 2))  # q's and o's at positions 3 and 4
    for target in ("q", "k", "v", "o"):
        want = slot.delta(target, h)[:, 3:5] if target in "qo" else slot.delta(target, h)
        np.testing.assert_allclose(last[target], want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def small_looped(fixture):
    """(config, weights) of a 4-layer looped model with every feature of the fixture's 7
    (layer 1 run twice: 5 applications, not 11; the last one on two lanes, the sparse head
    gate, XSA everywhere), random weights: the tests of the chunk step's own paths below
    compare two of its programs, not the reference, and compile in half the time."""
    cfg = fixture[0]
    mcfg = dataclasses.replace(cfg.model, num_layers=4, loop_start=1, loop_end=1, num_loops=1, parallel_start_layer=3,
                               xsa_last_n=4)
    params = model.init_params(mcfg, jax.random.key(0))
    # perturbed: the zero-initialised weights (output projections, gates) would hide their paths
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([a + 0.05 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])
    return dataclasses.replace(cfg, model=mcfg), params


def scored_window(cfg):
    """(LoRA with B nonzero, so that every adapter acts; tokens x, targets y of a 32-token
    window; the scored chunk's first position and length)."""
    rows, width = cfg.ttt.lora_batch_docs, 32
    lora = ttt_lora.fresh_lora(ttt_lora.random_init_a(cfg.model, cfg.ttt.lora_rank, 0)(0, rows), cfg.model, cfg.ttt)
    rng = np.random.default_rng(1)
    lora = lora.replace(factors={k: (a, jnp.asarray(0.01 * rng.standard_normal(b.shape), jnp.float32))
                                 for k, (a, b) in lora.factors.items()})
    x, y = (jnp.asarray(rng.integers(2, cfg.model.vocab_size, (rows, width)), jnp.int32) for _ in range(2))
    return lora, x, y, 13, 8


def test_the_last_application_runs_on_the_scored_positions_only(small_looped):
    """model.lora_token_nll with (first, count): the last layer application and the head on
    those positions only, the same losses and LoRA gradients as the whole window's, sliced
    (float32; the last attention on the dense path, its sums in another order: 1e-5 for the
    losses, the parity tests' 1e-4 for gradients)."""
    cfg, params = small_looped
    lora, x, y, first, count = scored_window(cfg)

    def scored_nll(lora, positions_only: bool):  # (their sum, the scored positions' losses)
        n = (model.lora_token_nll(params, cfg.model, x, y, lora, looping=True, first=first, count=count)
             if positions_only else model.lora_token_nll(params, cfg.model, x, y, lora, looping=True)[
                 :, first:first + count])
        return jnp.sum(n), n

    # jitted, losses and gradients in one program each: eager, op by op, the looped model's
    # forward and backward took 35-46 s of the suite
    loss_and_grad = jax.jit(jax.value_and_grad(scored_nll, has_aux=True), static_argnums=1)
    (_, whole), g_whole = loss_and_grad(lora, False)
    (_, part), g_part = loss_and_grad(lora, True)
    np.testing.assert_allclose(part, whole, rtol=1e-5, atol=1e-6)
    for u, v in zip(jax.tree.leaves(g_part), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


def test_the_chunk_step_through_the_mix_and_gated_xsa_kernels(small_looped):
    """configs/frontier.py names the residual-mix kernel (kernels/residual_norm.py), so the chunk
    step runs it on GPUs, the last application's mixes on the scored positions only; and
    with it XSA's kernels with the head gate inside (xsa_gate), the gate at the scored
    positions: the scored losses and every LoRA gradient equal the jnp path's (float32, the
    kernels interpreted; their sums in another order: 1e-5 for the losses, the parity
    tests' 1e-4)."""
    cfg, params = small_looped
    lora, x, y, first, count = scored_window(cfg)

    def scored_nll(lora, mcfg):
        n = model.lora_token_nll(params, mcfg, x, y, lora, looping=True, first=first, count=count)
        return jnp.sum(n), n

    loss_and_grad = jax.jit(jax.value_and_grad(scored_nll, has_aux=True), static_argnums=1)
    cfgs = {impl: dataclasses.replace(cfg.model, fusion_impl=impl, fusion_kernels="residual_norm,xsa,xsa_gate",
                                      scales_in_float32=True) for impl in ("jnp", "pallas")}
    assert all(layers.fusion_impl(cfgs["pallas"], k) == "pallas" for k in ("residual_norm", "xsa", "xsa_gate"))
    assert cfgs["pallas"].sparse_attn_gate
    out = {impl: loss_and_grad(lora, mcfg) for impl, mcfg in cfgs.items()}
    (_, nll), grads = out["pallas"]
    (_, nll_jnp), grads_jnp = out["jnp"]
    np.testing.assert_allclose(nll, nll_jnp, rtol=1e-5, atol=1e-6)
    for u, v in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_jnp)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
