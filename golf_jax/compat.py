"""Conversion between our params pytree and the PyTorch reference's state_dict
names, so reference weights (a `final_model.pt`, or arrays in an .npz) can be
evaluated, trained on and quantised here, and our gradients compared with its.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from golf_jax.config import ModelConfig
from golf_jax.model import Params

BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank", "skip_weights")
# Per-block tensors: our key under params["blocks"] -> the reference's suffix.
BLOCK_KEYS = {"attn_scale": "attn_scale", "mlp_scale": "mlp_scale", "resid_mix": "resid_mix",
              "q_gain": "attn.q_gain"}
NESTED = {  # (our section, our key) -> reference name
    ("bigram", "embed"): "bigram.embed.weight",
    ("bigram", "proj"): "bigram.proj.weight",
    ("bigram", "scale"): "bigram.scale",
    ("ve", "embed"): "ve_shared.embed.weight",
    ("ve", "proj"): "ve_shared.proj.weight",
    ("ve", "scale"): "ve_shared.scale",
}
TOP = {"tok_emb": "tok_emb.weight", "smear_gate": "smear.gate", "lm_head": "lm_head.weight"}


class CompatError(ValueError):
    """A reference state that does not fit the config; the message names the tensor."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Reference name -> shape for this config (optional projections included)."""
    L, d, kv, hid, V = cfg.num_layers, cfg.model_dim, cfg.kv_dim, cfg.mlp_dim, cfg.vocab_size
    shapes = {
        "tok_emb.weight": (V, d), "qo_bank": (2 * L, d, d), "kv_bank": (2 * L, kv, d),
        "mlp_up_bank": (L, hid, d), "mlp_down_bank": (L, d, hid), "skip_weights": (cfg.num_skip_weights, d),
        "smear.gate": (d,),
    }
    for i in range(L):
        shapes.update({f"blocks.{i}.attn_scale": (d,), f"blocks.{i}.mlp_scale": (d,),
                       f"blocks.{i}.resid_mix": (2, d), f"blocks.{i}.attn.q_gain": (cfg.num_heads,)})
    if cfg.bigram_enabled:
        shapes.update({"bigram.embed.weight": (cfg.bigram_vocab_size, cfg.bigram_dim),
                       "bigram.proj.weight": (d, cfg.bigram_dim), "bigram.scale": ()})
    if cfg.ve_layer_indices:
        shapes.update({"ve_shared.embed.weight": (V, cfg.ve_dim), "ve_shared.proj.weight": (kv, cfg.ve_dim),
                       "ve_shared.scale": ()})
        shapes.update({f"ve_layer_scales.{j}": (1,) for j in range(len(cfg.ve_layer_indices))})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, d)
    return shapes


# A projection whose two sides are equal may be absent (an identity) in the reference.
OPTIONAL = ("bigram.proj.weight", "ve_shared.proj.weight")


def params_from_reference(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Reference-named arrays -> params, keeping each array's dtype.

    Every name the config needs must be present with its shape; unknown
    names are an error, so a state from another architecture fails loudly.
    """
    shapes = expected_shapes(cfg)
    state = {k: np.asarray(v) for k, v in state.items()}
    missing = [k for k in shapes if k not in state
               and not (k in OPTIONAL and shapes[k][0] == shapes[k][1])]
    unknown = [k for k in state if k not in shapes]
    if missing or unknown:
        raise CompatError("reference state does not match the config: "
                          + (f"missing {', '.join(missing)}" if missing else "")
                          + ("; " if missing and unknown else "")
                          + (f"unexpected {', '.join(unknown)}" if unknown else ""))
    for k, v in state.items():
        if tuple(v.shape) != shapes[k]:
            raise CompatError(f"{k}: shape {tuple(v.shape)}, the config needs {shapes[k]}")

    params: Params = {k: jnp.asarray(state[k]) for k in BANKS}
    for ours, theirs in TOP.items():
        if theirs in state:
            params[ours] = jnp.asarray(state[theirs])
    params["blocks"] = {ours: jnp.stack([jnp.asarray(state[f"blocks.{i}.{theirs}"]) for i in range(cfg.num_layers)])
                        for ours, theirs in BLOCK_KEYS.items()}
    for (section, key), theirs in NESTED.items():
        if theirs in state:
            params.setdefault(section, {})[key] = jnp.asarray(state[theirs])
    if cfg.ve_layer_indices:
        params["ve"]["layer_scales"] = jnp.stack(
            [jnp.asarray(state[f"ve_layer_scales.{j}"]) for j in range(len(cfg.ve_layer_indices))])
    return params


def params_to_reference(tree: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Params (or a gradient tree of the same structure) -> reference names."""
    out = {k: np.asarray(tree[k]) for k in BANKS}
    for ours, theirs in TOP.items():
        if ours in tree:
            out[theirs] = np.asarray(tree[ours])
    for ours, theirs in BLOCK_KEYS.items():
        stacked = np.asarray(tree["blocks"][ours])
        for i in range(cfg.num_layers):
            out[f"blocks.{i}.{theirs}"] = stacked[i]
    for (section, key), theirs in NESTED.items():
        if section in tree and key in tree[section]:
            out[theirs] = np.asarray(tree[section][key])
    if "ve" in tree:
        scales = np.asarray(tree["ve"]["layer_scales"])
        for j in range(scales.shape[0]):
            out[f"ve_layer_scales.{j}"] = scales[j]
    return out


def load_reference_state(path: str | Path) -> dict[str, np.ndarray]:
    """Read reference weights: an .npz of reference-named arrays (a `param/`
    prefix, as in the fixtures, is accepted) or, with torch installed, a
    reference `final_model.pt` state_dict. bf16 tensors stay bf16."""
    path = Path(path)
    if not path.is_file():
        raise CompatError(f"{path}: reference weights not found")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                names = [k for k in z.files if k.startswith("param/")] or list(z.files)
                return {k.removeprefix("param/"): z[k] for k in names}
        except (OSError, ValueError) as e:
            raise CompatError(f"{path}: not a readable .npz ({e})") from None
    try:
        import torch
    except ImportError:
        raise CompatError(f"{path}: reading a PyTorch checkpoint needs torch installed") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise CompatError(f"{path}: not a readable PyTorch state_dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CompatError(f"{path}: expected a state_dict, got {type(state).__name__}")
    out = {}
    for k, t in state.items():
        k = k.removeprefix("_orig_mod.")  # saved from a torch.compile'd module
        if t.dtype == torch.bfloat16:
            out[k] = t.float().numpy().astype(jnp.bfloat16)
        else:
            out[k] = t.numpy()
    return out
