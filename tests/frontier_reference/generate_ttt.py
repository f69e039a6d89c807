"""Generate the fixture of the 1.0611 record's phased score-first LoRA TTT
(tests/ttt_lora_test.py reads it).

Reads: the 1.0611 record's own code (`eval_val_ttt_phased` and everything it calls), run as
tests/frontier_reference/generate.py runs it (CPU, float32, the SDPA stand-in for
FlashAttention, FUSED_CE_ENABLED=0, TORCHDYNAMO_DISABLE=1, BOS_ID=1, the MLP's Triton kernel
off), on that generator's tiny model: its parameters are read from model_frontier_tiny.npz,
not written again. Nothing of golf_jax is imported.

Run from the repository root after generate.py (seconds):

    python tests/frontier_reference/generate_ttt.py [--reference ../shared/reference/frontier_1855]

Writes, beside this file, ttt_lora_tiny.npz:
- `tokens` [N] (int64): a validation stream of documents (BOS = 1; it starts with tokens
  before the first BOS, which no document holds; the last document has no BOS after it) and
  `val_bytes` [N]: each token's byte count (the CaseOps sidecar; BOS 0);
- `env_names`, `env_values`: the environment the reference ran with (its TTT settings);
- per scored chunk, in order: `chunk_rows` [C, bsz] (each row's loss sum over the chunk's
  scored positions, float64, 0 for an inactive row), `chunk_loss`, `chunk_bytes`,
  `chunk_tokens` [C] (the increments of the reference's loss, byte and token sums);
- `loss`, `bpb`: eval_val_ttt_phased's result.

The LoRA's A factors: the reference draws them with torch's generator; here each
BatchedLinearLoRA's A is overwritten right after construction with `lora_a` (numpy, keyed
by the construction's index, the target and the layer application), so that the test
builds the same values without a fixture of them.

The run: the tiny model, looped; 14 documents in batches of 4 (the 2 longest first, a
partial batch with a fresh LoRA), 8-token chunks with up to 32 tokens of context (documents
longer than that slide their window), rank 4 with alpha 7.2 (scale 1.8, the record's),
learning rates raised (0.01 for the LoRA's AdamW, 0.01 for the global SGD) so that every
adaptation moves the scores well beyond float32 noise, and 2 global phases over the first 6
scored documents (boundaries 3 and 6: after the second and the third batch, so the last two
batches are scored after one and two phases), their SGD over 32-token chunks of 16-token
sequences (documents longer than 16 split, as the reference's cu_seqlens split them).
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generate import BOS_ID, DEFAULT_REFERENCE, ENV, import_reference  # noqa: E402

TTT_ENV = {
    "TTT_LORA_RANK": "4", "TTT_LORA_ALPHA": "7.2", "TTT_LORA_LR": "0.01", "TTT_CHUNK_SIZE": "8",
    "TTT_EVAL_SEQ_LEN": "32", "TTT_BATCH_SIZE": "4", "TTT_BETA2": "0.99", "TTT_WEIGHT_DECAY": "0.5",
    "PHASED_TTT_PREFIX_DOCS": "6", "PHASED_TTT_NUM_PHASES": "2", "GLOBAL_TTT_LR": "0.01",
    "GLOBAL_TTT_CHUNK_TOKENS": "32", "EVAL_SEQ_LEN": "16", "RUN_ID": "golf_jax_ttt_lora_fixture",
}
DOC_LENGTHS = [5, 12, 40, 9, 23, 61, 17, 3, 34, 28, 2, 15, 47, 20]  # each with its BOS; the 2 longest: a partial batch
LORA_TARGETS = ("q", "k", "v", "o", "mlp")
HEAD = len(LORA_TARGETS)  # lora_a's target index of the head's adapter


def lora_a(construction: int, target: int, slot: int, shape: tuple[int, ...], in_features: int) -> np.ndarray:
    """A factor of the `construction`-th LoRA (in the reference's order of constructions),
    `target` an index into LORA_TARGETS (HEAD for the head), `slot` the layer application
    (0 for the head): uniform in +-1/sqrt(in_features), as the reference draws it."""
    bound = 1.0 / math.sqrt(in_features)
    rng = np.random.default_rng([construction, target, slot])
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def stream(rng: np.random.Generator, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (3 before the first BOS, then the documents) and their byte counts."""
    tokens = list(rng.integers(BOS_ID + 1, vocab, size=3))
    for n in DOC_LENGTHS:
        tokens += [BOS_ID] + list(rng.integers(BOS_ID + 1, vocab, size=n - 1))
    tokens = np.asarray(tokens, np.int64)
    val_bytes = np.where(tokens == BOS_ID, 0, rng.integers(0, 5, size=tokens.size)).astype(np.int64)
    return tokens, val_bytes


def patch_lora_init(ref, torch) -> None:
    """Every BatchedTTTLoRA's A factors from `lora_a`, numbered in construction order."""
    original = ref.BatchedTTTLoRA.__init__
    count = [0]

    def init(self, bsz, model, rank, **kwargs):
        original(self, bsz, model, rank, **kwargs)
        c = count[0]
        count[0] += 1
        with torch.no_grad():
            for t, name in enumerate(LORA_TARGETS):
                for s, lora in enumerate(getattr(self, f"{name}_loras")):
                    lora.A.copy_(torch.from_numpy(lora_a(c, t, s, tuple(lora.A.shape), lora.A.shape[-1])))
            head = self.lm_head_lora
            head.A.copy_(torch.from_numpy(lora_a(c, HEAD, 0, tuple(head.A.shape), head.A.shape[-1])))

    ref.BatchedTTTLoRA.__init__ = init


def record_chunks(ref, torch, out: dict) -> None:
    """Wrap the reference's per-chunk accumulation: record each chunk's per-row loss sums
    and the increments of its running sums."""
    original = ref._accumulate_bpb

    def accumulate(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *args, y_bytes=None):
        loss_sum, byte_sum, token_count = args[3:6]
        before = (loss_sum.item(), byte_sum.item(), token_count.item())
        original(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *args, y_bytes=y_bytes)
        pos = pos_idx[: x.size(1)].unsqueeze(0)
        mask = (chunk_lens.unsqueeze(1) > 0) & (pos >= chunk_offsets.unsqueeze(1)) & (
            pos < (chunk_offsets + chunk_lens).unsqueeze(1))
        rows = (ptl.detach().double() * mask.double()).sum(dim=1).numpy()
        out["chunk_rows"].append(np.pad(rows, (0, int(ref_batch_size(ref)) - rows.size)))
        for name, b, now in zip(("chunk_loss", "chunk_bytes", "chunk_tokens"), before,
                                (loss_sum.item(), byte_sum.item(), token_count.item())):
            out[name].append(now - b)

    ref._accumulate_bpb = accumulate


def ref_batch_size(ref) -> int:
    return ref.Hyperparameters().ttt_batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    args = parser.parse_args()
    env = {**ENV, **TTT_ENV}
    ref = import_reference(args.reference, env)
    import torch
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    h = ref.Hyperparameters()
    model = ref.GPT(h).float()
    for block in model.blocks:
        block.mlp.use_fused = False  # its Triton kernel needs a Hopper GPU
    with np.load(HERE / "model_frontier_tiny.npz") as z:
        state = {k.removeprefix("param/"): torch.from_numpy(z[k]) for k in z.files if k.startswith("param/")}
    model.load_state_dict(state)
    model.looping_active = True

    tokens, val_bytes = stream(np.random.default_rng(3), h.vocab_size)
    val_data = types.SimpleNamespace(val_tokens=torch.from_numpy(tokens), val_bytes=torch.from_numpy(val_bytes),
                                     caseops_enabled=True, base_bytes_lut=None, has_leading_space_lut=None,
                                     is_boundary_token_lut=None)
    out = {"chunk_rows": [], "chunk_loss": [], "chunk_bytes": [], "chunk_tokens": []}
    patch_lora_init(ref, torch)
    record_chunks(ref, torch, out)
    loss, bpb = ref.eval_val_ttt_phased(
        h, model, torch.device("cpu"), val_data,
        forward_ttt_train=lambda x, y, lora: model.forward_ttt(x, y, lora=lora))

    arrays = {"tokens": tokens, "val_bytes": val_bytes, "env_names": np.array(list(TTT_ENV)),
              "env_values": np.array(list(TTT_ENV.values())), "loss": np.float64(loss), "bpb": np.float64(bpb)}
    arrays.update({k: np.asarray(v, np.float64) for k, v in out.items()})
    np.savez_compressed(HERE / "ttt_lora_tiny.npz", **arrays)
    size = (HERE / "ttt_lora_tiny.npz").stat().st_size
    print(f"wrote {HERE}/ttt_lora_tiny.npz ({size / 1e3:.1f} kB): {len(out['chunk_loss'])} chunks, "
          f"loss {loss:.6f}, bpb {bpb:.6f}")


if __name__ == "__main__":
    main()
