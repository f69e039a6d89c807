"""KV-cached generation against the full forward; Hessians against the reference."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from golf_jax import generate, model
from golf_jax.config import Config, DataConfig, ModelConfig, QuantConfig, RunConfig

ROPE_LEN = 2048  # > rope_ntk_base_len, so the NTK-scaled base is the one under test


def test_cached_logits_equal_full_forward(tiny_params, tiny_cfg):
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, tiny_cfg.vocab_size)
    full = model.logits(tiny_params, tiny_cfg, tokens, rope_len=ROPE_LEN)
    cache = generate.init_cache(tiny_params, tiny_cfg, 2, 40)
    step = jax.jit(generate.forward_chunk, static_argnames=("cfg", "rope_len"))
    got = []
    z, cache = step(tiny_params, tiny_cfg, cache, tokens[:, :9], rope_len=ROPE_LEN)  # a prefill
    got.append(z)
    for t in range(9, 40):  # then one token at a time
        z, cache = step(tiny_params, tiny_cfg, cache, tokens[:, t:t + 1], rope_len=ROPE_LEN)
        got.append(z)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    # float32 both ways; the cache path only changes the summation order of
    # the attention (masked keys beyond the prefix): ~1e-6 seen.
    np.testing.assert_allclose(got, np.asarray(full), atol=1e-4, rtol=0)
    assert int(cache["pos"]) == 40


def test_greedy_generation_is_the_full_forwards_argmax(tiny_params, tiny_cfg):
    prompt = jnp.asarray([[5, 77, 300], [1, 2, 3]], jnp.int32)
    out = generate.generate(tiny_params, tiny_cfg, prompt, jax.random.key(1), num_new=12, temperature=0.0,
                            rope_len=ROPE_LEN)
    assert out.shape == (2, 15)
    np.testing.assert_array_equal(np.asarray(out[:, :3]), np.asarray(prompt))
    z = np.asarray(model.logits(tiny_params, tiny_cfg, out, rope_len=ROPE_LEN))
    np.testing.assert_array_equal(np.asarray(out[:, 3:]), z[:, 2:-1].argmax(-1))


def test_sampling_is_seeded_and_follows_temperature(tiny_params, tiny_cfg):
    prompt = jnp.zeros((4, 1), jnp.int32)
    gen = lambda seed, temp: np.asarray(generate.generate(  # noqa: E731
        tiny_params, tiny_cfg, prompt, jax.random.key(seed), num_new=8, temperature=temp, rope_len=ROPE_LEN))
    a, b, c = gen(0, 0.8), gen(0, 0.8), gen(1, 0.8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < tiny_cfg.vocab_size


def test_calibration_set_shape_and_determinism(tiny_params, tiny_cfg):
    cfg = Config(model=tiny_cfg, data=DataConfig(train_seq_len=64),
                 quant=QuantConfig(calib_num_seqs=5, calib_seq_len=16, calib_batch_size=2), run=RunConfig(seed=7))
    a = generate.calibration_tokens(tiny_params, cfg)
    assert a.shape == (5, 16) and a.dtype == np.int32
    np.testing.assert_array_equal(a, generate.calibration_tokens(tiny_params, cfg))
    assert len(np.unique(a[:, 0])) > 1  # first tokens drawn, not fixed


def test_bad_counts_are_one_line_errors(capsys):
    import pytest
    for args in (["--tokens", "-5"], ["--samples", "0"], ["--temperature", "-1"]):
        with pytest.raises(SystemExit) as e:
            generate.main(["--artifact", "unused.golf", *args])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {args[0]} ") and err.count("\n") == 1


def test_a_model_trained_on_the_fallback_decodes_with_its_own_tokenizer(tmp_path, shared_data, pydoc_data, capsys):
    """The first-hour mistake: a model trained without ../shared (the pydoc
    fallback and its tokenizer), then sampled where ../shared is present. Its
    recorded tokenizer is used, or the command stops with a clear error:
    never the competition tokenizer's gibberish."""
    import shutil

    import pytest

    from golf_jax import checkpoint, datasets
    from tests.train_test import tiny_config

    cfg = tiny_config(tmp_path)  # data.data_dir "embedded": here the competition tokenizer
    pydoc_tokenizer = pydoc_data / "tokenizer.model"
    record = datasets.Dataset(str(pydoc_data / "t*.bin"), str(pydoc_data / "v*.bin"), str(pydoc_tokenizer),
                              "pydoc").record()
    checkpoint.save_params(tmp_path / "final_model", model.init_params(cfg.model, jax.random.key(0)), cfg, record)

    def sample(*extra):
        generate.main(["--checkpoint", str(tmp_path), "--tokens", "24", "--seed", "3", *extra])
        return capsys.readouterr().out.split("--- sample 0\n")[1]

    own = sample()
    assert own == sample("--tokenizer", str(pydoc_tokenizer))
    assert own != sample("--tokenizer", str(shared_data / datasets.EMBEDDED_TOKENIZER))  # what it used to print
    # The recorded tokenizer is gone: one line naming both files, exit 2.
    kept = tmp_path / "kept.model"
    shutil.copy(pydoc_tokenizer, kept)
    record["tokenizer"] = datasets.tokenizer_identity(kept)
    (tmp_path / "final_model" / checkpoint.DATASET_FILE).write_text(json.dumps(record))
    kept.unlink()
    with pytest.raises(SystemExit) as e:
        sample()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert str(kept) in err and datasets.EMBEDDED_TOKENIZER in err


def test_recomputing_generation_is_the_cached_one(tiny_params, tiny_cfg):
    """Without a cache, greedy: the same tokens as the cached path."""
    prompt = jnp.asarray([[5, 77, 300], [1, 2, 3]], jnp.int32)
    kwargs = dict(num_new=12, temperature=0.0, rope_len=ROPE_LEN)  # the greedy test's program, compiled once
    cached = generate.generate(tiny_params, tiny_cfg, prompt, jax.random.key(1), **kwargs)
    again = generate.generate_recomputing(tiny_params, tiny_cfg, prompt, jax.random.key(1), looping=False, **kwargs)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(cached))


def test_a_looped_model_generates_through_its_loop(frontier_ref):
    """The 1.0611 record's model (a layer loop after training): sample_text_ids takes the
    path without a cache; each greedy token is the argmax of the looped model's logits."""
    from golf_jax import compat

    mcfg, _, model_ref = frontier_ref
    assert mcfg.looping_after_training
    params = compat.params_from_reference({k[6:]: v for k, v in model_ref.items() if k.startswith("param/")}, mcfg)
    cfg = Config(model=mcfg, data=DataConfig(train_seq_len=64))
    prompt = jnp.asarray([[mcfg.bos_id, 9, 17]], jnp.int32)
    out = np.asarray(generate.sample_text_ids(params, cfg, prompt, jax.random.key(0), 5, 0.0))
    z = np.asarray(model.logits(params, mcfg, out, 64, looping=True))
    np.testing.assert_array_equal(out[:, 3:], z[:, 2:-1].argmax(-1))
    assert not np.allclose(np.asarray(model.logits(params, mcfg, out, 64, looping=False)), z)  # the loop matters


def test_caseops_prompts_and_samples_are_the_original_text(caseops_tokenizer):
    """A CaseOps model's prompt: BOS, then the transformed text's tokens; its samples
    decoded back to the original case, an operator out of place dropped."""
    from golf_jax import caseops, data

    sp = data.load_tokenizer(caseops_tokenizer)
    cfg = Config(model=ModelConfig(vocab_size=8192), data=DataConfig(text_transform="caseops"))
    text = "The QUICK brown McFox, said Ann."
    ids = generate.prompt_ids(sp, cfg, text)
    assert ids[0] == cfg.model.bos_id and ids[1:] == sp.encode(caseops.encode(text))
    assert generate.sample_text(sp, cfg, ids) == text
    title = sp.piece_to_id(caseops.TITLE)
    assert generate.sample_text(sp, cfg, ids + [title]) == text  # a TITLE with no word after it: dropped
    plain = Config(model=ModelConfig(vocab_size=8192))
    assert generate.sample_text(sp, plain, ids) == sp.decode(ids) != text
