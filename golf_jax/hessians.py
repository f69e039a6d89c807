"""The GPTQ Hessians: H = X^T X / N + damping * mean(diag) I of every linear
layer's input X, from the Gram matrices the model sows (model.INPUT_GRAMS)
while it runs on the calibration tokens, stacked as the banks are."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from golf_jax import model, param_tree
from golf_jax.config import ModelConfig
from golf_jax.param_tree import Params
from golf_jax.quant import QuantError


# The sown Gram matrices that feed each bank's row blocks: Q (and K, V) and
# the out-projection read the attention's input and output, the MLP's banks
# its input and hidden activation.
BANK_INPUTS = {
    "qo_bank": ("attn/qkv", "attn/proj"),
    "kv_bank": ("attn/qkv", "attn/qkv"),
    "mlp_up_bank": ("mlp/fc",),
    "mlp_down_bank": ("mlp/proj",),
}
SMALL_INPUTS = ("bigram/proj", "ve/proj")  # sown under the parameter's own path


FINAL_NORM = "final_norm"  # sown by model.GPT.hidden: the tied head's input


@functools.partial(jax.jit, static_argnames=("cfg", "looping", "embedding"))
def _input_grams(params: Params, cfg: ModelConfig, tokens_BxT: jax.Array,
                 looping: bool = False, embedding: bool = False) -> dict[str, jax.Array]:
    """{"layers_3/attn/qkv": X^T X, "bigram/proj": ...} of one batch; the
    forward's output is unused, so XLA drops the last matmul. With the depth
    recurrence a looped layer sows one Gram per application: they are summed,
    as the 1.0611 record's hooks accumulate every call (collect_hessians, L2039).
    embedding: also the final norm's output's ("final_norm"; else dropped, uncomputed)."""
    _, state = model.GPT(cfg).apply({"params": params}, tokens_BxT, looping=looping, method=model.GPT.hidden,
                                    mutable=[model.INPUT_GRAMS])
    flat = jax.tree_util.tree_flatten_with_path(state[model.INPUT_GRAMS], is_leaf=lambda x: isinstance(x, tuple))[0]
    # sown values are tuples, one per call (a 1-tuple unlooped: reduce returns it untouched)
    grams = {param_tree.path_name(path): functools.reduce(jnp.add, sown) for path, sown in flat}
    return grams if embedding else {k: v for k, v in grams.items() if k != FINAL_NORM}


def collect_hessians(params: Params, cfg: ModelConfig, tokens_NxT: np.ndarray, batch_size: int,
                     damping: float = 0.01, progress: bool = False, looping: bool = False,
                     per_batch: bool = False, embedding: bool = False) -> dict[str, jax.Array]:
    """H = X^T X / N + damping * mean(diag) I for every linear layer's input X,
    the model run on tokens[:, :-1] (as the reference does), float32.

    Returns {"qo_bank": [2L, d, d], "kv_bank": [2L, d, d], "mlp_up_bank": [L, d, d],
    "mlp_down_bank": [L, h, h], "bigram/proj", "ve/proj"}, bank rows aligned
    with the bank's matrices.

    The 1.0611 record's (damping=0, per_batch=True, embedding=True): X^T X / the
    number of batches, undamped (GPTQ damps), and "tok_emb" [d, d], the Gram of
    the final norm's output, the tied head's input (only with tied embeddings).
    """
    if embedding and not cfg.tie_embeddings:
        raise QuantError("hessians: the embedding's Hessian is the tied head's input; this model's head is untied")
    inputs = np.asarray(tokens_NxT)[:, :-1]
    n = inputs.shape[0]
    sums: dict | None = None
    for i in tqdm(range(0, n, batch_size), desc="hessians", unit="batch", disable=not progress):
        grams = _input_grams(params, cfg, jnp.asarray(inputs[i:i + batch_size]), looping, embedding)
        _check_finite_grams(grams, f"sequences {i}..{min(i + batch_size, n) - 1}")
        sums = grams if sums is None else jax.tree.map(jnp.add, sums, grams)
    # reference quirk (1.0611): the sums are divided by the number of calibration batches
    divisor = -(-n // batch_size) if per_batch else n

    def finish(g):
        h = g / divisor
        if damping == 0:
            return h
        # reference: the mean diagonal is clamped at 1e-6 before scaling
        return h + damping * jnp.maximum(jnp.mean(jnp.diag(h)), 1e-6) * jnp.eye(h.shape[0], dtype=h.dtype)

    L = cfg.num_layers
    hessians = {k: finish(v) for k, v in sums.items()}
    out = {bank: jnp.stack([hessians[f"layers_{layer}/{site}"] for site in sites for layer in range(L)])
           for bank, sites in BANK_INPUTS.items()}
    out.update({name: hessians[name] for name in SMALL_INPUTS if name in hessians})
    if embedding:
        out["tok_emb"] = hessians[FINAL_NORM]
    return out


_SITES = ("bigram/proj", "ve/proj", "attn/qkv", "attn/proj", "mlp/fc", "mlp/proj")


def _forward_order(key: str) -> tuple[int, int]:
    """Where a sown Gram's input is computed in the forward pass."""
    if key in SMALL_INPUTS:
        return -1, _SITES.index(key)
    if key == FINAL_NORM:  # after every layer
        return 1 << 30, 0
    layer, site = key.split("/", 1)
    return int(layer.removeprefix("layers_")), _SITES.index(site)


def _check_finite_grams(grams: dict, where: str) -> None:
    """A NaN or inf in an activation would silently poison GPTQ: name it."""
    finite = jax.device_get({k: jnp.all(jnp.isfinite(g)) for k, g in grams.items()})
    bad = sorted((k for k, ok in finite.items() if not ok), key=_forward_order)  # the first is where it starts
    if bad:
        later = f" (and {len(bad) - 1} inputs after it)" if len(bad) > 1 else ""
        raise QuantError(f"hessians: the input of {bad[0]}{later} holds NaN or inf on calibration "
                         f"{where}: the model's activations overflow there")
