"""Conversion between our params pytree and the PyTorch reference's state_dict
names, so reference weights (a `final_model.pt`, or arrays in an .npz) can be
evaluated, trained on and quantised here, and our gradients compared with its.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from golf_jax import model, param_tree
from golf_jax.config import ModelConfig
from golf_jax.param_tree import Params

BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank", "skip_weights")
# Per-block tensors: our key under params["blocks"] -> the reference's suffix.
BLOCK_KEYS = {"attn_scale": "attn_scale", "mlp_scale": "mlp_scale", "resid_mix": "resid_mix",
              "q_gain": "attn.q_gain", "attn_gate_w": "attn.attn_gate_w"}
NESTED = {  # (our section, our key) -> reference name
    ("bigram", "embed"): "bigram.embed.weight",
    ("bigram", "proj"): "bigram.proj.weight",
    ("bigram", "scale"): "bigram.scale",
    ("ve", "embed"): "ve_shared.embed.weight",
    ("ve", "proj"): "ve_shared.proj.weight",
    ("ve", "scale"): "ve_shared.scale",
    ("smear", "gate"): "smear_gate.weight",  # the 1.0611 record's SmearGate
    ("smear", "lambda"): "smear_lambda",
}
TOP = {"tok_emb": "tok_emb.weight", "smear_gate": "smear.gate", "lm_head": "lm_head.weight",
       "skip_gates": "skip_gates", "parallel_resid_lambdas": "parallel_resid_lambdas",
       "parallel_post_lambdas": "parallel_post_lambdas"}


class CompatError(ValueError):
    """A reference state that does not fit the config, or a weights file that
    cannot be read; the message names the file (where known) and the tensor."""


class ReferenceState(dict):
    """Reference name -> array, remembering the file it was read from so that
    `params_from_reference` can name it in its errors."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str):
        super().__init__(arrays)
        self.source = source


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Reference name -> shape for this config: model.init_params's shapes
    (the one table of them) under the reference's names."""
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    # Zero-stride stand-ins: params_to_reference slices them as it would the arrays.
    stand_ins = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), np.uint8), x.shape), shapes)
    return {name: tuple(a.shape) for name, a in params_to_reference(stand_ins, cfg).items()}


def params_from_reference(state: Mapping[str, np.ndarray], cfg: ModelConfig, source: str | None = None) -> Params:
    """Reference-named arrays -> params, keeping each array's dtype.

    Every name the config needs must be present with its shape and a floating
    dtype; unknown names are an error, so a state from another architecture
    fails loudly. Errors start with `source` (by default the file a
    `load_reference_state` result came from).
    """
    source = source if source is not None else getattr(state, "source", None)
    prefix = f"{source}: " if source else ""
    shapes = expected_shapes(cfg)
    state = {k: np.asarray(v) for k, v in state.items()}
    missing = [k for k in shapes if k not in state]
    unknown = [k for k in state if k not in shapes]
    if missing or unknown:
        raise CompatError(f"{prefix}reference state does not match the config: "
                          + (f"missing {_some(missing)}" if missing else "")
                          + ("; " if missing and unknown else "")
                          + (f"unexpected {_some(unknown)}" if unknown else ""))
    for k, v in state.items():
        if tuple(v.shape) != shapes[k]:
            raise CompatError(f"{prefix}{k}: shape {tuple(v.shape)}, the config needs {shapes[k]}")
        # jnp.asarray would take int arrays silently and fail on the rest deep inside JAX.
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise CompatError(f"{prefix}{k}: dtype {v.dtype}, expected floating point weights")

    # Stacked on the host, then put on the device: jnp.stack and jnp.asarray compile a
    # program per shape (18 compilations of an artifact's reload at the 1.0611 record's size).
    params: Params = {k: state[k] for k in BANKS}
    for ours, theirs in TOP.items():
        if theirs in state:
            params[ours] = state[theirs]
    params["blocks"] = {ours: np.stack([state[f"blocks.{i}.{theirs}"] for i in range(cfg.num_layers)])
                        for ours, theirs in BLOCK_KEYS.items() if f"blocks.0.{theirs}" in state}
    for (section, key), theirs in NESTED.items():
        if theirs in state:
            params.setdefault(section, {})[key] = state[theirs]
    if cfg.ve_layer_indices:
        scales = [state[f"ve_layer_scales.{j}"] for j in range(len(cfg.ve_layer_indices))]
        params["ve"]["layer_scales"] = np.stack(scales)
    return jax.device_put(params)


def _some(names: list[str], limit: int = 8) -> str:
    """The first names of a list, so a wholly wrong file gives one readable line."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def params_to_reference(tree: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Params (or a gradient tree of the same structure) -> reference names."""
    out = {k: np.asarray(tree[k]) for k in BANKS}
    for ours, theirs in TOP.items():
        if ours in tree:
            out[theirs] = np.asarray(tree[ours])
    for ours, theirs in BLOCK_KEYS.items():
        if ours not in tree["blocks"]:
            continue
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
    prefix, as in the fixtures, is accepted; uint16 arrays are bf16 bits) or, with torch installed, a
    reference `final_model.pt` state_dict. bf16 tensors stay bf16."""
    path = Path(path)
    if not path.exists():
        raise CompatError(f"{path}: reference weights not found")
    if not path.is_file():
        raise CompatError(f"{path}: not a file, expected reference weights (.npz or .pt)")
    if path.stat().st_size == 0:
        raise CompatError(f"{path}: empty file, not reference weights")
    if path.suffix == ".npz":
        return ReferenceState(_read_npz(path), str(path))
    try:
        import torch
    except ImportError:
        raise CompatError(f"{path}: reading a PyTorch checkpoint needs torch installed "
                          "(pip install torch, or pass an .npz of reference-named arrays)") from None
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
    return ReferenceState(out, str(path))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy and zipfile raise many types for a bad file
        raise CompatError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise CompatError(f"{path}: not a readable .npz (it holds one .npy array, not named arrays)")
    with z:
        names = [k for k in z.files if k.startswith("param/")] or list(z.files)
        out = {}
        for k in names:
            try:
                arr = z[k]  # each member is decompressed and CRC-checked here
            except Exception as e:
                raise CompatError(f"{path}: not a readable .npz: cannot read array {k!r} "
                                  f"({type(e).__name__}: {e})") from e
            if arr.dtype == np.dtype("V2"):
                # np.save writes ml_dtypes' bfloat16 as raw 2-byte void ('|V2'),
                # so an .npz of our own bf16 embeddings comes back as that.
                arr = arr.view(jnp.bfloat16)
            elif arr.dtype == np.uint16:
                # bf16 bit patterns (the fixtures' *_bf16bits.npz): the upper
                # half of each float32. No weight is an integer, so this is unambiguous.
                arr = arr.view(jnp.bfloat16)
            out[k.removeprefix("param/")] = arr
    return out


def initial_params(cfg: ModelConfig, init_from: str, seed: int) -> Params:
    """A run's starting weights: the reference's (`init_from`: .npz or
    final_model.pt) in golf_jax's dtypes, else a fresh init from `seed`."""
    if init_from:
        return param_tree.cast_params(params_from_reference(load_reference_state(init_from), cfg), cfg)
    return model.init_params(cfg, jax.random.key(seed))
