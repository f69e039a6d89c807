"""The parameter tree: its paths, the dtype rule, counts and the table
printed at launch, and the layouts of earlier golf_jax versions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from golf_jax.config import ModelConfig

Params = dict
EMBEDDING_KEYS = ("tok_emb", "bigram/embed", "ve/embed")


def path_name(path) -> str:
    """A params-tree path as "section/key", e.g. "bigram/proj"."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def embedding_dtype(cfg: ModelConfig) -> jnp.dtype:
    # reference quirk: the model is cast to bf16 and only banks, small linears
    # and scalars go back to fp32, so the embedding tables stay bf16.
    return jnp.dtype(cfg.embedding_dtype)


def cast_params(params: Params, cfg: ModelConfig) -> Params:
    """Apply the parameter dtype rule: embedding tables in cfg.embedding_dtype,
    everything else float32."""
    def cast(path, x):
        return jnp.asarray(x, embedding_dtype(cfg) if path_name(path) in EMBEDDING_KEYS else jnp.float32)

    return jax.tree_util.tree_map_with_path(cast, params)


def param_count(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# Until 2026-11-30 (params layout 1) golf_jax gave BigramHash and the value
# embedding a projection even between equal widths; the Flax model (layout 2)
# leaves it out, as the reference does. Only such configs (configs/smoke.py's
# value embedding, 64 = 64, until then) are affected.
LEGACY_LAYOUT = ("a projection between equal widths, saved by golf_jax before 2026-11-30 (params layout 1); "
                 "this golf_jax (params layout 2, the Flax model) has none there, as the reference: "
                 "retrain the model with it")


def legacy_projections(cfg: ModelConfig) -> tuple[str, ...]:
    """The params that layout 1 had for this config and layout 2 has not."""
    return tuple(name for name, equal in (
        ("bigram/proj", cfg.bigram_enabled and cfg.bigram_dim == cfg.model_dim),
        ("ve/proj", bool(cfg.ve_layer_indices) and cfg.ve_dim == cfg.kv_dim)) if equal)


def summary(params: Params) -> str:
    """A table of the parameters: shape, dtype and count of each, a subtotal
    per submodule, and the total (printed at launch).

    Flax's `tabulate` is not used: it counts the bank slices each `Block`
    receives as that block's inputs, so its total is more than twice the
    model's."""
    lines = [f"{'parameter':<24} {'shape':<16} {'dtype':<9} {'count':>11}"]
    for module, sub in params.items():
        leaves = jax.tree_util.tree_leaves_with_path(sub)
        for path, x in leaves:
            name = "/".join([module, path_name(path)]) if path else module
            lines.append(f"{name:<24} {'x'.join(map(str, x.shape)) or '-':<16} {jnp.dtype(x.dtype).name:<9} "
                         f"{int(np.prod(x.shape)):>11,}")
        if len(leaves) > 1:
            lines.append(f"{module + ' (module)':<51} {param_count(sub):>11,}")
    lines.append(f"{'total':<51} {param_count(params):>11,}")
    return "\n".join(lines)


