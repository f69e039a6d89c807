"""Autoregressive generation with a KV cache and the self-generated GPTQ
calibration set (the Hessians collected from it: golf_jax/hessians.py).

Generation is one jitted program: a prefill of the prompt, then a
`lax.scan` that feeds one token per step through the blocks. The KV cache is
`model.GPT`'s "cache" collection: each attention layer's K and V
([batch, max_len, kv_heads, head_dim]), and the position, the previous token
and its normed embedding (BigramHash and SmearGate need them).

A model with a layer loop after training (the 1.0611 record's depth recurrence)
takes `generate_recomputing` instead: the cache holds one K/V per layer, not per
application of a looped layer, so every step reruns the whole buffer (causal:
the unwritten positions change nothing before them). Its CaseOps text is
transformed for the prompt and decoded back for the samples.

Difference from the reference, on purpose: the reference recomputes the whole
prefix at every step, so its rotary base changes when the prefix passes 1024
tokens (its NTK quirk, see `layers.rotary_base`) and every earlier position's
keys change with it. A cache cannot follow that; every position here uses the
base of `rope_len` (the training sequence length, 2048 in the record), the
base the model was trained and is evaluated with.

    python -m golf_jax.generate --artifact runs/smoke/model.golf --prompt "To be"
    python -m golf_jax.generate --checkpoint runs/smoke --prompt "To be" --samples 3
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from golf_jax import caseops, checkpoint, cli, data, datasets, model
from golf_jax.config import Config, ModelConfig
from golf_jax.param_tree import Params


Cache = dict  # the "cache" collection of `model.GPT` (see its docstring)


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "max_len"))
def init_cache(params: Params, cfg: ModelConfig, batch: int, max_len: int) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` positions.

    Flax's way: a decode call on an input of the cache's shape creates the
    cache variables; the forward it traces is dead code, dropped by XLA.
    """
    dummy = jnp.zeros((batch, max_len), jnp.int32)
    _, state = model.GPT(cfg).apply({"params": params}, dummy, rope_len=max_len, decode=True,
                                    method=model.GPT.hidden, mutable=["cache"])
    return state["cache"]


def forward_chunk(params: Params, cfg: ModelConfig, cache: Cache, tokens_BxT: jax.Array,
                  rope_len: int) -> tuple[jax.Array, Cache]:
    """Feed T tokens at positions cache["pos"].. (a prefill, or T = 1 per step):
    soft-capped float32 logits [B, T, V] and the cache with them written."""
    z, state = model.GPT(cfg).apply({"params": params, "cache": cache}, tokens_BxT, rope_len=rope_len,
                                    decode=True, mutable=["cache"])
    return z, state["cache"]


def sample(key: jax.Array, logits_BxV: jax.Array, temperature: float) -> jax.Array:
    """Temperature sampling; temperature 0 is greedy."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits_BxV / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "num_new", "temperature", "rope_len"))
def generate(params: Params, cfg: ModelConfig, prompt_BxP: jax.Array, key: jax.Array, *, num_new: int,
             temperature: float, rope_len: int) -> jax.Array:
    """The prompt followed by num_new sampled tokens: int32 [B, P + num_new]."""
    B, P = prompt_BxP.shape
    cache = init_cache(params, cfg, B, P + num_new)
    z, cache = forward_chunk(params, cfg, cache, prompt_BxP, rope_len)

    def step(carry, step_key):
        cache, last_z = carry
        token = sample(step_key, last_z, temperature)
        z, cache = forward_chunk(params, cfg, cache, token[:, None], rope_len)
        return (cache, z[:, -1]), token

    # The last step's forward is wasted (1 of num_new); it keeps the loop uniform.
    _, new_NxB = jax.lax.scan(step, (cache, z[:, -1]), jax.random.split(key, num_new))
    return jnp.concatenate([prompt_BxP.astype(jnp.int32), new_NxB.T], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "num_new", "temperature", "rope_len", "looping"))
def generate_recomputing(params: Params, cfg: ModelConfig, prompt_BxP: jax.Array, key: jax.Array, *, num_new: int,
                         temperature: float, rope_len: int, looping: bool) -> jax.Array:
    """`generate` without a cache, for any model (looping: its depth recurrence):
    each step runs the blocks over a buffer of P + num_new tokens (the head on
    the one position it samples from), so its cost grows with the square of the
    length."""
    B, P = prompt_BxP.shape
    buffer = jnp.zeros((B, P + num_new), jnp.int32).at[:, :P].set(prompt_BxP.astype(jnp.int32))

    def step(buffer, i_and_key):
        i, step_key = i_and_key
        h = model.hidden(params, cfg, buffer, rope_len, looping=looping)
        z = model.logits_from_hidden(params, cfg, jax.lax.dynamic_slice_in_dim(h, P + i - 1, 1, axis=1))
        token = sample(step_key, z[:, 0], temperature)
        return jax.lax.dynamic_update_slice(buffer, token[:, None], (0, P + i)), None

    buffer, _ = jax.lax.scan(step, buffer, (jnp.arange(num_new), jax.random.split(key, num_new)))
    return buffer


def sample_text_ids(params: Params, cfg: Config, prompt_BxP: jax.Array, key: jax.Array, num_new: int,
                    temperature: float) -> jax.Array:
    """The model's continuation of the prompt: cached (`generate`), or with a
    layer loop after training `generate_recomputing`, which loops as the model
    is evaluated."""
    kwargs = dict(num_new=num_new, temperature=temperature, rope_len=cfg.data.train_seq_len)
    if cfg.model.looping_after_training:
        return generate_recomputing(params, cfg.model, prompt_BxP, key, looping=True, **kwargs)
    return generate(params, cfg.model, prompt_BxP, key, **kwargs)


def prompt_ids(sp, cfg: Config, prompt: str) -> list[int]:
    """The prompt's token ids; a CaseOps model's (data.text_transform) from the
    transformed text after BOS, as its documents start."""
    if cfg.data.text_transform == "caseops":
        return [cfg.model.bos_id] + sp.encode(caseops.encode(prompt))
    return sp.encode(prompt) if prompt else []


def sample_text(sp, cfg: Config, ids: Sequence[int]) -> str:
    """Token ids as text; a CaseOps model's decoded back to the original case."""
    text = sp.decode(list(ids))
    return caseops.decode_sampled(text) if cfg.data.text_transform == "caseops" else text


def calibration_tokens(params: Params, cfg: Config, key: jax.Array | None = None,
                       progress: bool = False) -> np.ndarray:
    """The self-generated calibration set: calib_num_seqs x calib_seq_len tokens,
    each sequence from a first token uniform over the vocabulary, sampled at
    calib_temperature, calib_batch_size sequences per program."""
    q, mcfg = cfg.quant, cfg.model
    key = jax.random.key(cfg.run.seed) if key is None else key
    n, bs = q.calib_num_seqs, min(q.calib_batch_size, q.calib_num_seqs)
    out = []
    for _ in tqdm(range(math.ceil(n / bs)), desc="calibration", unit="batch", disable=not progress):
        key, k_first, k_rest = jax.random.split(key, 3)
        first = jax.random.randint(k_first, (bs, 1), 0, mcfg.vocab_size, jnp.int32)
        out.append(np.asarray(generate(params, mcfg, first, k_rest, num_new=q.calib_seq_len - 1,
                                       temperature=q.calib_temperature, rope_len=cfg.data.train_seq_len)))
    return np.concatenate(out)[:n]


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m golf_jax.generate",
                                     description="Sample text from a trained model (KV-cached).")
    checkpoint.add_model_source(parser)
    parser.add_argument("--prompt", default="", help="text to continue (empty: a uniform random first token)")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per sample")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args, _ = cli.parse_with_overrides(parser, argv)
    cli.require_at_least(parser, ("--tokens", args.tokens, 1), ("--samples", args.samples, 1),
                         ("--temperature", args.temperature, 0))
    try:
        params, cfg, source, record = checkpoint.load_model(artifact_path=args.artifact,
                                                            checkpoint_path=args.checkpoint)
        # The model's own tokenizer: another one would decode its ids into gibberish.
        ds = datasets.dataset_for_model(cfg.data, cfg.model.vocab_size, record, args.tokenizer, source)
        sp = data.load_tokenizer(ds.tokenizer, cfg.model.vocab_size, cfg.data.text_transform)
    except checkpoint.LOAD_ERRORS as e:
        parser.exit(2, f"error: {e}\n")
    key = jax.random.key(args.seed)
    ids = prompt_ids(sp, cfg, args.prompt)
    if ids:
        prompt = jnp.tile(jnp.asarray(ids, jnp.int32)[None], (args.samples, 1))
    else:
        key, k = jax.random.split(key)
        prompt = jax.random.randint(k, (args.samples, 1), 0, cfg.model.vocab_size, jnp.int32)
    t0 = time.perf_counter()
    out = np.asarray(sample_text_ids(params, cfg, prompt, key, args.tokens, args.temperature))
    dt = time.perf_counter() - t0
    print(f"# {source}; {args.samples} x {args.tokens} tokens in {dt:.1f} s (compile included), "
          f"temperature {args.temperature}")
    for i, row in enumerate(out):
        print(f"--- sample {i}")
        print(sample_text(sp, cfg, row.tolist()))


if __name__ == "__main__":
    main()
