"""Standard and sliding-window evaluation against the reference, and the main job."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import data, datasets, evaluate, model
from golf_jax.config import Config, ConfigError, DataConfig, EvalConfig, ModelConfig
from golf_jax.runlog import CompileCounter
from tests.conftest import REPO, fixture_path


@pytest.fixture(scope="module")
def eval_ref():
    with np.load(fixture_path("eval_tiny.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def tables(eval_ref):
    return data.ByteTables(eval_ref["base_bytes"], eval_ref["has_leading_space"], eval_ref["is_boundary"])


def test_standard_eval_matches_reference(tiny_params, tiny_cfg, eval_ref, tables):
    r = evaluate.standard_eval(tiny_params, tiny_cfg, eval_ref["val_tokens"], tables, seq_len=128, batch_windows=5)
    assert r.tokens == 3000 // 128 * 128  # the partial tail window is dropped, as the reference
    assert abs(r.loss - float(eval_ref["val_loss"])) <= 1e-5
    assert abs(r.bpb - float(eval_ref["val_bpb"])) <= 1e-5


def test_sliding_eval_matches_reference(tiny_params, tiny_cfg, eval_ref, tables):
    # 94 windows in batches of 16: the last batch is padded and masked.
    r = evaluate.sliding_eval(tiny_params, tiny_cfg, eval_ref["val_tokens"], tables, seq_len=128, stride=32,
                              batch_windows=16)
    assert r.tokens == 3096  # reference quirk: the tail is scored several times
    assert abs(r.loss - float(eval_ref["sliding_loss"])) <= 1e-5
    assert abs(r.bpb - float(eval_ref["sliding_bpb"])) <= 1e-5


def test_sliding_score_once_scores_each_target_with_the_most_context(tiny_params, tiny_cfg, eval_ref, tables):
    toks = eval_ref["val_tokens"][:701]
    r = evaluate.sliding_eval(tiny_params, tiny_cfg, toks, tables, seq_len=128, stride=32, batch_windows=7,
                              score_once=True)
    assert r.tokens == 700 and r.bytes == int(tables.target_bytes(toks).sum())
    # Brute force: target j is scored in the window starting at the largest
    # multiple of 32 that holds it with >= 96 tokens of context (or at 0).
    starts = np.arange(0, 700, 32)
    owner = np.array([max([s for s in starts if s + 128 > j and (s == 0 or j - s >= 96)] or [0])
                      for j in range(700)])
    nll = np.zeros(700)
    for s in np.unique(owner):
        n = min(128, 700 - s)
        x, y = np.zeros((1, 128), np.int32), np.zeros((1, 128), np.int32)
        x[0, :n], y[0, :n] = toks[s:s + n], toks[s + 1:s + 1 + n]
        window_nll = np.asarray(model.token_nll(tiny_params, tiny_cfg, jnp.asarray(x), jnp.asarray(y)))[0]
        js = np.nonzero(owner == s)[0]
        nll[js] = window_nll[js - s]
    assert abs(r.loss - nll.mean()) <= 1e-5


def test_plans():
    p = evaluate.sliding_plan(3000, 128, 32)
    assert len(p.starts) == 94 and int(np.sum(p.hi - p.lo)) == 3096
    once = evaluate.sliding_plan(3000, 128, 32, score_once=True)
    covered = np.zeros(3000, int)
    for s, lo, hi in zip(once.starts, once.lo, once.hi):
        covered[s + lo:s + hi] += 1
    assert np.all(covered == 1)
    std = evaluate.standard_plan(3000, 128)
    assert len(std.starts) == 23 and np.all(std.hi - std.lo == 128)


def test_batch_size_does_not_change_the_result(tiny_params, tiny_cfg, eval_ref, tables):
    toks = eval_ref["val_tokens"][:1025]
    a = evaluate.sliding_eval(tiny_params, tiny_cfg, toks, tables, 128, 64, batch_windows=3)
    b = evaluate.sliding_eval(tiny_params, tiny_cfg, toks, tables, 128, 64, batch_windows=16)
    assert a.tokens == b.tokens and abs(a.loss - b.loss) < 1e-6  # float32 per-window sums, float64 total


def test_main_job_runs_on_embedded_data(tmp_path, shared_data, capsys):
    """The README's main command, on the smoke config."""
    evaluate.main(["--config", str(REPO / "configs/smoke.py"), "--no-progress", f"--config.run.output_dir={tmp_path}",
                   "--config.eval.max_val_tokens=4096", "--out", str(tmp_path / "fresh.json")])
    out = capsys.readouterr().out
    assert "standard: loss" in out and "sliding: loss" in out and "fresh init, seed 314" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.json"]  # nothing beside a run's own outputs
    result = json.loads((tmp_path / "fresh.json").read_text())
    assert result["model"] == "fresh init, seed 314"
    # A fresh model predicts close to uniformly: loss near ln(1024).
    assert abs(result["standard"]["loss"] - np.log(1024)) < 0.1
    assert result["sliding"]["tokens"] >= 4096


def test_main_job_errors_before_compiling(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--config", str(REPO / "configs/smoke.py"), f"--config.data.data_dir={tmp_path / 'missing'}",
                       "--config.data.tokenizer_path=x.model"])
    assert e.value.code == 2
    assert "data directory not found" in capsys.readouterr().err


def test_standard_and_sliding_share_one_compilation(tiny_params, tiny_cfg, eval_ref, tables):
    """With the record's batch rule the standard evaluation and the sliding
    one's first batch run one compiled program; the sliding batches after it
    (every window scoring its last `stride`) one more, the logits-for-those-
    positions-only program."""
    from golf_jax import cli
    record = cli.load_config_file(str(REPO / "configs/record.py"))
    assert record.eval.standard_batch_windows(record.data.micro_batches_per_step) == record.eval.sliding_batch_windows
    cfg = cli.apply_overrides(record, [("eval_seq_len", "128"), ("sliding_stride", "32"), ("sliding_batch_windows", "4"),
                                       ("val_batch_tokens", str(4 * 128 * 8))])
    cfg = dataclasses.replace(cfg, model=tiny_cfg)
    before = evaluate.window_loss_sums._cache_size()
    results = evaluate.run_evaluations(tiny_params, cfg, eval_ref["val_tokens"][:1025], tables, progress=False)
    assert results["standard"].tokens == 1024 and results["sliding"].tokens > 1024
    assert evaluate.window_loss_sums._cache_size() == before + 2


@pytest.mark.parametrize("document_masked", [False, True])
def test_the_program_compiled_ahead_is_the_one_the_evaluation_calls(document_masked, tiny_params, tiny_cfg, eval_ref,
                                                                    tables):
    """`compile_standard` from zeros of the weights' shapes (the quantize pipeline runs it
    beside the artifact's reload): the standard evaluation then compiles nothing, with
    consecutive windows or document rows (a batch size of its own: programs not compiled
    by the module's other tests)."""
    cfg = Config(model=tiny_cfg, data=DataConfig(micro_batches_per_step=8),
                 eval=EvalConfig(eval_seq_len=64, val_batch_tokens=3 * 64 * 8, document_masked=document_masked,
                                 document_eval_ranks=1))
    tokens = eval_ref["val_tokens"][:6 * 64 + 1].copy()
    tokens[::50] = tiny_cfg.bos_id  # documents for the document rows
    shaped = jax.device_put(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tiny_params))
    with CompileCounter() as ahead:
        evaluate.compile_standard(shaped, cfg, tokens)
    with CompileCounter() as during:
        result = evaluate.run_standard(tiny_params, cfg, tokens, tables, progress=False)
    program = "jit(packed_row_loss_sum)" if document_masked else "jit(window_loss_sums)"
    assert ahead.names[program] == 1 and during.count == 0, during.names
    assert result.tokens == 6 * 64


def test_scored_span_program_equals_the_full_one(tiny_params, tiny_cfg, eval_ref):
    """Logits for the last `span` positions only give the same per-window
    sums as logits everywhere (float32: rel 1e-6), for the plan's windows
    including the short tail ones (hi < span: clipped positions are masked)."""
    tokens = jnp.asarray(evaluate.padded_tokens(eval_ref["val_tokens"][:700].astype(np.int32), 128))
    plan = evaluate.sliding_plan(699, 128, 32)
    first = 1  # window 0 scores all its positions: the full program only
    lo, hi, starts = (a[first:].astype(np.int32) for a in (plan.lo, plan.hi, plan.starts))
    assert evaluate.span_for(lo, hi, 32) == 32 and evaluate.span_for(plan.lo, plan.hi, 32) == 0
    assert np.min(hi) < 32  # the tail
    full = evaluate.window_loss_sums(tiny_params, tiny_cfg, tokens, starts, lo, hi, 128)
    span = evaluate.window_loss_sums(tiny_params, tiny_cfg, tokens, starts, lo, hi, 128, 32)
    np.testing.assert_allclose(np.asarray(span), np.asarray(full), rtol=1e-6)
    assert float(jnp.min(full)) > 0


# ----------------------------------------------------------------------------- the byte sidecar

@pytest.fixture(scope="module")
def sidecar(eval_ref):
    """Original-byte counts for the fixture's val tokens (0 at BOS, as prepare writes them)."""
    tokens = eval_ref["val_tokens"]
    counts = np.random.default_rng(0).integers(0, 9, len(tokens))
    counts[tokens == 1] = 0
    return data.ByteSidecar(counts.astype(np.int64), "sidecar")


def test_standard_eval_counts_the_sidecars_bytes(tiny_params, tiny_cfg, eval_ref, tables, sidecar):
    """As the reference's eval_val (L2786): per batch of whole sequences,
    val_bytes[raw_start + 1 : raw_end]; bits per byte sum nats / (ln 2 x bytes)."""
    tokens, seq_len, batch_seqs = eval_ref["val_tokens"], 128, 5
    r = evaluate.standard_eval(tiny_params, tiny_cfg, tokens, sidecar, seq_len=seq_len, batch_windows=batch_seqs)
    total_seqs = (len(tokens) - 1) // seq_len
    want_bytes = sum(int(sidecar.counts[start * seq_len + 1:min(start + batch_seqs, total_seqs) * seq_len + 1].sum())
                     for start in range(0, total_seqs, batch_seqs))
    assert r.bytes == want_bytes and r.tokens == total_seqs * seq_len
    assert abs(r.loss - float(eval_ref["val_loss"])) <= 1e-5  # the loss is the tables' run's
    assert r.bpb == pytest.approx(r.loss * r.tokens / (math.log(2) * want_bytes), rel=1e-14)  # float64 op order


def test_sliding_eval_counts_the_sidecars_bytes(tiny_params, tiny_cfg, eval_ref, sidecar):
    """Each window's scored targets' sidecar entries, the tail's repeats included."""
    tokens = eval_ref["val_tokens"]
    r = evaluate.sliding_eval(tiny_params, tiny_cfg, tokens, sidecar, seq_len=128, stride=32, batch_windows=16)
    plan = evaluate.sliding_plan(len(tokens) - 1, 128, 32)
    want = sum(int(sidecar.counts[s + 1 + lo:s + 1 + hi].sum()) for s, lo, hi in zip(plan.starts, plan.lo, plan.hi))
    assert r.bytes == want and r.tokens == 3096
    assert abs(r.loss - float(eval_ref["sliding_loss"])) <= 1e-5
    assert r.bpb == pytest.approx(r.loss * r.tokens / (math.log(2) * want), rel=1e-14)  # float64 op order


def caseops_cfg(**data_fields) -> Config:
    return Config(model=ModelConfig(vocab_size=8192), data=DataConfig(text_transform="caseops", **data_fields),
                  eval=EvalConfig(eval_seq_len=2048))


def test_load_validation_takes_the_sidecar_with_caseops(caseops_data, tmp_path):
    ds = datasets.Dataset(str(caseops_data / "fineweb_train_*.bin"), str(caseops_data / "fineweb_val_*.bin"),
                          str(caseops_data / "tokenizer.model"))
    tokens, counts = evaluate.load_validation(caseops_cfg(), ds)
    assert isinstance(counts, data.ByteSidecar) and (len(tokens) - 1) % 2048 == 0
    whole = data.read_shard(caseops_data / "fineweb_val_bytes_000000.bin")
    np.testing.assert_array_equal(counts.target_bytes(tokens), whole[1:len(tokens)])
    with pytest.raises(data.DataError, match="set data.text_transform='caseops'"):
        evaluate.load_validation(dataclasses.replace(caseops_cfg(), data=DataConfig()), ds)
    # The val shard without its sidecar: named, with the field that finds it.
    shutil.copy(caseops_data / "fineweb_val_000000.bin", tmp_path)
    alone = dataclasses.replace(ds, val_pattern=str(tmp_path / "fineweb_val_*.bin"))
    with pytest.raises(data.DataError, match=rf"{tmp_path}/fineweb_val_bytes_\*.bin: no byte sidecar found "
                                             rf"\(data.val_bytes_pattern\)"):
        evaluate.load_validation(caseops_cfg(), alone)


def test_evaluations_after_training_run_the_layer_loop(eval_ref, tables):
    """With a depth recurrence, the evaluations as configured (run_standard without
    `looping`, run_sliding) run the looped model (ModelConfig.looping_after_training), as
    the 1.0611 record's evaluation models; training's validation passes its own state."""
    import jax

    looped = ModelConfig(num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, bigram_vocab_size=0,
                         ve_enabled=False, xsa_last_n=3, rope_dims=8, num_loops=1, loop_start=1, loop_end=1,
                         compute_dtype="float32", attention_impl="jnp")
    cfg = Config(model=looped, eval=EvalConfig(eval_seq_len=128, val_batch_tokens=4 * 128 * 8, sliding_stride=64,
                                                sliding_batch_windows=4))
    rng = np.random.default_rng(0)  # away from the init, whose blocks (zero projections) are the identity
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.05, p.shape).astype(p.dtype),
                          model.init_params(looped, jax.random.key(0)))
    tokens = eval_ref["val_tokens"][:513]
    after = evaluate.run_standard(params, cfg, tokens, tables, progress=False)
    assert after.loss == evaluate.standard_eval(params, looped, tokens, tables, 128, 4, False, looping=True).loss
    unlooped = evaluate.run_standard(params, cfg, tokens, tables, progress=False, looping=False)
    assert unlooped.loss != after.loss
    sliding = evaluate.run_sliding(params, cfg, tokens, tables, progress=False)
    assert sliding.loss == evaluate.sliding_eval(params, looped, tokens, tables, 128, 64, 4, progress=False,
                                                 looping=True).loss


# ----------------------------------------------------------------------------- the 1.0611 record's eval_val

def documents_stream(n_tokens: int, vocab: int, bos: int, seed: int = 0) -> np.ndarray:
    """Random tokens in documents of 1 to 120 tokens, each opening with BOS."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(bos + 1, vocab, n_tokens).astype(np.int32)
    starts = np.cumsum(rng.integers(1, 120, n_tokens))
    tokens[starts[starts < n_tokens]] = bos
    tokens[0] = bos
    return tokens


# The record's eval_val asks for CUDA autocast; torch on the CPU says it turns it off (float32 here).
@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_document_masked_eval_is_the_records_eval_val(frontier_ref):
    """eval.document_masked against the 1.0611 record's own eval_val (run with torch on
    the CPU, its 8 ranks one after another, their sums added as its all-reduce does),
    given golf_jax's model as its forward: the same rows (each rank's last partial batch
    dropped), the same document boundaries (its cu_seqlens), the same token and byte
    counts, exactly; the loss to float32 (cross-entropy of the same logits in torch
    and in JAX, summed in other orders: 1e-6)."""
    torch = pytest.importorskip("torch")
    import types

    from golf_jax import compat, packing
    from tests.conftest import reference_source

    mcfg, _, model_ref = frontier_ref
    params = compat.params_from_reference({k[6:]: v for k, v in model_ref.items() if k.startswith("param/")}, mcfg)
    seq, looping = 64, mcfg.looping_after_training
    cfg = Config(model=mcfg, data=DataConfig(micro_batches_per_step=8),
                 eval=EvalConfig(eval_seq_len=seq, val_batch_tokens=2 * seq * 8, document_masked=True))
    tokens = documents_stream(45 * seq + 1 + 37, mcfg.vocab_size, mcfg.bos_id)  # 45 sequences: 5 or 6 per rank,
    # in batches of 2: 42 taken
    counts = np.random.default_rng(1).integers(1, 9, len(tokens))
    counts[tokens == mcfg.bos_id] = 0
    sidecar = data.ByteSidecar(counts.astype(np.int64), "sidecar")

    ns = {"torch": torch, "F": torch.nn.functional, "dist": types.SimpleNamespace(is_available=lambda: False),
          "math": math, "BOS_ID": None}
    exec(reference_source("frontier_1855/train_gpt.py", "get_next_multiple_of_n", "_build_cu_seqlens", "eval_val"), ns)
    ns["_loss_bpb"] = lambda *sums: sums  # each rank's sums, to be added across ranks

    def our_logits(x, cu_seqlens, max_seqlen):
        x = x.numpy().astype(np.int32)
        cu = cu_seqlens.numpy()
        np.testing.assert_array_equal(cu, packing.document_segments(np.flatnonzero(x[0] == mcfg.bos_id), x.shape[1],
                                                                    seq)[0])
        segments = packing.make_segments(cu, x.shape[1], seq, packing.segments_per_fold_needed(cu, x.shape[1], seq))
        return torch.from_numpy(np.array(model.logits(params, mcfg, x, looping=looping, segments=segments)))

    val = types.SimpleNamespace(val_tokens=torch.from_numpy(tokens.astype(np.int64)),
                                val_bytes=torch.from_numpy(counts.astype(np.int32)))
    stub = types.SimpleNamespace(eval=lambda: None, train=lambda: None)
    sums = np.zeros(3)
    for rank in range(8):
        h = types.SimpleNamespace(eval_seq_len=seq, val_batch_tokens=cfg.eval.val_batch_tokens, world_size=8,
                                  grad_accum_steps=1, rank=rank)
        sums += [float(s) for s in ns["eval_val"](h, torch.device("cpu"), val, stub, forward_logits_fn=our_logits)]
    want_loss, want_tokens, want_bytes = sums[0] / sums[1], int(sums[1]), int(sums[2])

    got = evaluate.run_standard(params, cfg, tokens, sidecar, progress=False)
    assert (got.tokens, got.bytes) == (want_tokens, want_bytes) and want_tokens == 42 * seq
    assert got.loss == pytest.approx(want_loss, rel=1e-6)
    assert got.bpb == pytest.approx(want_loss / math.log(2) * want_tokens / want_bytes, rel=1e-6)
    # the rows are masked per document: without the masks the loss is another
    plain = evaluate.standard_eval(params, mcfg, tokens, sidecar, seq, 2, progress=False, looping=looping)
    assert abs(plain.loss / got.loss - 1) > 1e-4


def test_document_rows_drop_each_ranks_partial_batch():
    # 45 sequences over 8 ranks: 5 or 6 each, in batches of 2: 4 or 6 taken
    starts = evaluate.document_rows(45 * 64 + 10, 64, 2, 8) // 64
    per_rank = [range(45 * r // 8, 45 * (r + 1) // 8) for r in range(8)]
    assert [len(r) for r in per_rank] == [5, 6, 5, 6, 6, 5, 6, 6]
    want = [s for r in per_rank for s in list(r)[:len(r) // 2 * 2:2]]
    assert starts.tolist() == want and len(starts) == 21
    assert evaluate.document_rows(64 * 8, 64, 2, 8).size == 0


def test_too_few_validation_tokens_for_a_document_row_are_refused_before_compiling(eval_ref):
    cfg = Config(eval=EvalConfig(eval_seq_len=128, val_batch_tokens=4 * 128 * 8, document_masked=True))
    with pytest.raises(ConfigError, match=r"eval.document_masked: 1024 validation targets give none of the 8 ranks "
                                          r"\(eval.document_eval_ranks\) a whole batch of 4 x 128 tokens"):
        evaluate.configured_document_rows(cfg, 1025)
    assert evaluate.configured_document_rows(cfg, 4 * 128 * 8 + 1)[1] == 512
