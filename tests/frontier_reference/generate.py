"""Generate the 1.0611 record's model fixtures (tests/model_frontier_test.py reads them).

Reads: the 1.0611 record's own code, ../shared/reference/frontier_1855/train_gpt.py, and the
FlashAttention stand-in beside it (flash_attn_interface.py: torch SDPA, varlen as a
block-diagonal causal mask). Nothing of golf_jax is imported: the fixtures are the reference's.

Run from the repository root (CPU, float32, a few seconds; torch, triton and sentencepiece
installed, as the reference imports them):

    python tests/frontier_reference/generate.py [--reference ../shared/reference/frontier_1855]

(the default: $GOLF_JAX_REFERENCE/frontier_1855 when set, as the tests find the reference).

Writes, beside this file:
- model_frontier_tiny_config.json: the reference's hyperparameters that shape the model
  (its `Hyperparameters` attribute names), the packed row's BOS id and max_seqlen, and, from
  the reference built with its own defaults for the loop and the parallel decoder (11
  layers), its encoder and decoder orders and skip count (`record_orders`).
- model_frontier_tiny.npz:
  - `param/<name>`: a perturbed state_dict (the reference's names): its initialisation plus
    noise, so that every gate, lambda and zero-initialised matrix is non-zero and every
    gradient flows;
  - `x`, `y` [1, T]: one packed row of several documents (BOS = 1; it starts inside a
    document, as the loader's rows do, and one document is longer than train_seq_len, so it
    is split); `cu_seqlens` (the reference's `_build_cu_seqlens`, bucket 64);
  - for mode in (unlooped, looped): `<mode>/loss`, `<mode>/logits` [1, T, V] (forward_logits)
    and `<mode>/grad/<name>` for every parameter (the training forward, cross-entropy in float32).

The run: the environment overrides of the record (SPEC.md's table) that shape the model
(SMEAR_GATE_ENABLED=1, SPARSE_ATTN_GATE_ENABLED=1, SPARSE_ATTN_GATE_SCALE=0.5), a tiny
width, and the loop and parallel indices scaled to 7 layers (LOOP_START=2, LOOP_END=3,
NUM_LOOPS=2, PARALLEL_START_LAYER=5: encoder [0,1,2,3,2], decoder [3,2,3,4,5,6]); on the CPU as
SPEC.md describes: FUSED_CE_ENABLED=0, TORCHDYNAMO_DISABLE=1, BOS_ID set to 1, the MLP's
fused Triton kernel off (`mlp.use_fused=False`), float32 throughout (no bf16 cast).
Deterministic: rerunning writes the same arrays, whatever the shell's environment.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# As tests/conftest.py finds the reference: $GOLF_JAX_REFERENCE, else ../shared/reference.
DEFAULT_REFERENCE = Path(os.environ.get("GOLF_JAX_REFERENCE", HERE.parents[2] / "shared" / "reference")) / "frontier_1855"
BOS_ID = 1

ENV = {
    # The record's overrides that shape the model (SPEC.md's table).
    "SMEAR_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_SCALE": "0.5",
    # Tiny, with every feature in play.
    "VOCAB_SIZE": "64", "NUM_LAYERS": "7", "XSA_LAST_N": "7", "MODEL_DIM": "32", "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2", "ROPE_DIMS": "4", "TRAIN_SEQ_LEN": "32",
    "LOOP_START": "2", "LOOP_END": "3", "NUM_LOOPS": "2", "PARALLEL_START_LAYER": "5",
    # On the CPU (SPEC.md, "GPU-only code and the CPU fallback").
    "FUSED_CE_ENABLED": "0", "TORCHDYNAMO_DISABLE": "1",
}
# The Hyperparameters attributes the model reads (GPT.__init__ and its blocks).
MODEL_HPARAMS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                 "tie_embeddings", "tied_embed_init_std", "logit_softcap", "rope_base", "rope_dims",
                 "rope_yarn", "rope_train_seq_len", "train_seq_len", "ln_scale", "qk_gain_init", "xsa_last_n",
                 "num_loops", "loop_start", "loop_end", "parallel_start_layer", "parallel_final_lane",
                 "skip_gates_enabled", "smear_gate_enabled", "gate_window", "sparse_attn_gate_enabled",
                 "sparse_attn_gate_init_std", "sparse_attn_gate_scale", "attn_out_gate_enabled",
                 "gated_attn_enabled")


def import_reference(reference: Path, env: dict[str, str]):
    """The reference module, imported with `env` set and every other variable it reads
    unset (its Hyperparameters read the environment when the class is defined), so
    that the shell's environment changes nothing."""
    read = set(re.findall(r'os\.environ\.get\(\s*"([A-Z0-9_]+)"', (reference / "train_gpt.py").read_text()))
    for name in read - set(env):
        os.environ.pop(name, None)
    os.environ.update(env)
    sys.path.insert(0, str(reference))
    sys.modules.pop("train_gpt", None)
    module = importlib.import_module("train_gpt")
    module.BOS_ID = BOS_ID
    return module


def packed_row(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """T + 1 tokens: a document's tail, then documents of lengths 9, 40 (> train_seq_len 32:
    split), 1 (a BOS followed at once by a BOS), 14 and a last one cut by the row's end."""
    lengths = [7, 9, 40, 1, 14, 26]
    row = []
    for i, n in enumerate(lengths):
        body = list(rng.integers(BOS_ID + 1, vocab, size=n - 1 if i else n))
        row += body if i == 0 else [BOS_ID] + body
    return np.asarray(row, np.int64)


def perturb(model, torch, seed: int) -> None:
    """The initialisation plus noise: every parameter non-trivial (zero-init gates,
    lambdas and matrices included), at scales that keep the sigmoids unsaturated."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 3 and "bank" in name:  # [n, out, in]: of the order of an orthogonal row's entries
                p.add_(noise * 0.5 / p.shape[-1] ** 0.5)
            elif name == "tok_emb.weight":
                p.add_(noise * 0.05)
            elif "attn_gate_w" in name or "smear_gate" in name or "skip_gates" in name:
                p.add_(noise * 0.5)
            elif name == "smear_lambda":
                p.add_(0.5 + 0.1 * noise)
            else:  # scales, mixes, gains, lambdas
                p.add_(noise * 0.1)


def run_mode(ref, torch, model, x, y, cu_seqlens, max_seqlen, looping: bool) -> dict[str, np.ndarray]:
    model.looping_active = looping
    model.zero_grad(set_to_none=True)
    loss = model(x, y, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    loss.backward()
    with torch.no_grad():
        logits = model.forward_logits(x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    mode = "looped" if looping else "unlooped"
    out = {f"{mode}/loss": np.float32(loss.item()), f"{mode}/logits": logits.numpy().astype(np.float32)}
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        out[f"{mode}/grad/{name}"] = grad.numpy().astype(np.float32)
    return out


def record_orders(reference: Path) -> dict:
    """The encoder and decoder orders and the skip count the reference derives with its
    own defaults (11 layers, LOOP_START 3, LOOP_END 5, NUM_LOOPS 2), from a narrow model."""
    env = {k: v for k, v in ENV.items() if k not in ("NUM_LAYERS", "XSA_LAST_N", "LOOP_START", "LOOP_END",
                                                     "NUM_LOOPS", "PARALLEL_START_LAYER")}
    ref = import_reference(reference, env)
    model = ref.GPT(ref.Hyperparameters())
    return {"num_layers": model.num_layers, "encoder_indices": list(model.encoder_indices),
            "decoder_indices": list(model.decoder_indices), "num_skip_weights": model.num_skip_weights,
            "parallel_start_layer": model.parallel_start_layer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    args = parser.parse_args()
    orders = record_orders(args.reference)

    ref = import_reference(args.reference, ENV)
    import torch
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    h = ref.Hyperparameters()
    model = ref.GPT(h).float()
    for block in model.blocks:
        block.mlp.use_fused = False  # its Triton kernel needs a Hopper GPU
    perturb(model, torch, seed=1)

    tokens = packed_row(np.random.default_rng(2), h.vocab_size)
    x = torch.from_numpy(tokens[:-1])[None]
    y = torch.from_numpy(tokens[1:])[None]
    bos = (x[0] == BOS_ID).nonzero(as_tuple=True)[0].tolist()
    cu_seqlens, _ = ref._build_cu_seqlens(bos, x.shape[1], "cpu", max_doc_len=h.train_seq_len)
    max_seqlen = h.train_seq_len  # as the training step passes it

    arrays = {f"param/{k}": v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    arrays.update(x=x.numpy(), y=y.numpy(), cu_seqlens=cu_seqlens.numpy())
    for looping in (False, True):
        arrays.update(run_mode(ref, torch, model, x, y, cu_seqlens, max_seqlen, looping))
    np.savez_compressed(HERE / "model_frontier_tiny.npz", **arrays)

    config = {"hyperparameters": {k: getattr(h, k) for k in MODEL_HPARAMS}, "bos_id": BOS_ID,
              "max_seqlen": max_seqlen, "encoder_indices": list(model.encoder_indices),
              "decoder_indices": list(model.decoder_indices), "num_skip_weights": model.num_skip_weights,
              "record_orders": orders}
    (HERE / "model_frontier_tiny_config.json").write_text(json.dumps(config, indent=1) + "\n")
    size = (HERE / "model_frontier_tiny.npz").stat().st_size
    print(f"wrote {HERE}/model_frontier_tiny{{.npz,_config.json}} ({size / 1e6:.2f} MB); "
          f"loss unlooped {arrays['unlooped/loss']:.6f}, looped {arrays['looped/loss']:.6f}")


if __name__ == "__main__":
    main()
