"""Generate the 1.0611 record's quantisation fixtures (tests/quant_frontier_test.py and
tests/hessians_test.py read them), from the reference's own functions at tiny shapes.

Reads: ../shared/reference/frontier_1855/train_gpt.py (imported as generate.py imports it)
and this directory's model_frontier_tiny.npz (generate.py's perturbed tiny model). Nothing of
golf_jax is imported. Run from the repository root (CPU, float32, a few seconds):

    python tests/frontier_reference/generate_quant.py [--reference ../shared/reference/frontier_1855]

Writes quant_frontier_tiny.npz beside this file:
- GPTQ (`gptq_quantize_weight`, L2147): `W` float16 [32, 192] (its values, widened to float32,
  are the weights: float16 keeps the fixture small), `X` int8 [256, 192] activations of small
  integers, so H = X^T X (`H` below) is exact in float32 in any summation order; column 5 is
  dead (all zero), columns 0..63 correlate with 64..127 and a third of them are doubled (act-order
  moves them), and no two live columns have the same diagonal (`distinct_diagonal`). For each case <c> in attn (k 13, int6), mlp (k 11.5, int6), emb (k 14, int7):
  `gptq/<c>/q` int8, `gptq/<c>/scale` float16.
- Gate (`_quantize_gate_int8_row`, L2185): `gate/W` float32 [3, 4, 12] (three layers),
  `gate/q` int8, `gate/scale` float16, layer by layer.
- LQER (L2268) of the attn case's error E = W - q s: the reference's `torch.linalg.svd(E)`
  factors `lqer/U` [32, 4], `lqer/S` [4], `lqer/Vh` [4, 192]; its packings of A = U S, B = Vh:
  `lqer/asym/{qA,sA,qB,sB}` (`_lqer_pack_asym`, group 64) and `lqer/sym/{qA,sA,qB,sB}`
  (`_lqer_pack`, 4 bits); `lqer/recon_err`: ||E - (qA sA)(qB sB)||_F of the asymmetric packing.
  The int2 range [-2, 1] is asymmetric, so the packing depends on the SVD's signs: the tests
  pack these same factors (exact), and compare their own SVD's packing by its error.
- Hessians (`collect_hessians`, L2039) of the tiny model (generate.py's `param/*`, float32,
  looping on, dense `forward_logits`), on `hess/x` int64 [2, 2, 32] (two calibration batches
  of two sequences, as train_loader.next_batch returns them): for each of its 43 names (six per
  layer, c_q/c_k/c_v alike, and tok_emb.weight), `hess/<name>/diag` and `hess/<name>/probe`
  = H @ `hess/probes` [dim, 3] (the full matrices would not keep the fixture small; a wrong
  entry changes its probes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from generate import BOS_ID, DEFAULT_REFERENCE, ENV, HERE, import_reference

GPTQ_CASES = {"attn": (13.0, 31), "mlp": (11.5, 31), "emb": (14.0, 63)}  # (k, clip range)


def distinct_diagonal(X: np.ndarray, dead: int | None = None) -> np.ndarray:
    """X with the live columns' sums of squares (diag(X^T X)) all different: act-order sorts
    them, and torch's sort orders ties its own way (not by index), so tied columns would
    test the sort, not GPTQ. Bumps the first entry of a tied column until none is left."""
    X = X.copy()
    while True:
        diag = (X.astype(np.int64) ** 2).sum(axis=0)
        live = [j for j in range(X.shape[1]) if j != dead]
        seen, tied = set(), None
        for j in live:
            if diag[j] in seen:
                tied = j
                break
            seen.add(diag[j])
        if tied is None:
            return X
        X[0, tied] += 1


def gptq_inputs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    X = rng.integers(-3, 4, size=(256, 192))
    X[:, :64] += X[:, 64:128]
    X[:, ::3] *= 2
    X[:, 5] = 0
    X = distinct_diagonal(X, dead=5)
    W = (rng.standard_normal((32, 192)) * 0.05).astype(np.float16)
    W[3, 7] = np.float16(0.6)  # an outlier: its row's step grows with its std
    return W, X.astype(np.int8)


def gptq_fixtures(ref, torch, W16: np.ndarray, X: np.ndarray) -> dict:
    W = torch.from_numpy(W16.astype(np.float32))
    Xf = torch.from_numpy(X.astype(np.float32))
    H = Xf.T @ Xf  # integers below 2^24: exact
    out = {}
    for case, (k, cr) in GPTQ_CASES.items():
        q, s = ref.gptq_quantize_weight(W, H, clip_sigmas=k, clip_range=cr)
        out[f"gptq/{case}/q"], out[f"gptq/{case}/scale"] = q.numpy(), s.numpy()
    q, s = out["gptq/attn/q"], out["gptq/attn/scale"]
    E = W - torch.from_numpy(q).float() * torch.from_numpy(s).float().view(-1, 1)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A, B = (U[:, :4] * S[:4]).contiguous(), Vh[:4, :].contiguous()
    out.update({"lqer/U": U[:, :4].numpy(), "lqer/S": S[:4].numpy(), "lqer/Vh": Vh[:4].numpy()})
    for mode, packed in (("asym", ref._lqer_pack_asym(A, B, 64)), ("sym", ref._lqer_pack(A, B, 4))):
        out.update({f"lqer/{mode}/{n}": t.numpy() for n, t in zip(("qA", "sA", "qB", "sB"), packed)})
    qA, sA, qB, sB = (torch.from_numpy(out[f"lqer/asym/{n}"]) for n in ("qA", "sA", "qB", "sB"))
    Bd = (qB.reshape(-1, 64).float() * sB.float().view(-1, 1)).reshape(qB.shape)
    out["lqer/recon_err"] = np.float32((E - (qA.float() * float(sA)) @ Bd).norm().item())
    return out


def gate_fixtures(ref, torch, rng: np.random.Generator) -> dict:
    W = (rng.standard_normal((3, 4, 12)) * 0.5).astype(np.float32)
    packed = [ref._quantize_gate_int8_row(torch.from_numpy(w)) for w in W]
    return {"gate/W": W, "gate/q": np.stack([q.numpy() for q, _ in packed]),
            "gate/scale": np.stack([s.numpy() for _, s in packed])}


class FixedBatches:
    """A train_loader stand-in: the given batches in turn."""

    def __init__(self, torch, batches: np.ndarray):
        self.batches = [torch.from_numpy(b) for b in batches]

    def next_batch(self, global_tokens, grad_accum_steps):
        x = self.batches.pop(0)
        return x, x


def hessian_fixtures(ref, torch, rng: np.random.Generator) -> dict:
    h = ref.Hyperparameters()
    model = ref.GPT(h).float()
    with np.load(HERE / "model_frontier_tiny.npz") as z:
        state = {k.removeprefix("param/"): torch.from_numpy(z[k]) for k in z.files if k.startswith("param/")}
    model.load_state_dict(state, strict=True)
    model.looping_active = True
    x = rng.integers(BOS_ID + 1, h.vocab_size, size=(2, 2, h.train_seq_len)).astype(np.int64)
    x[0, 1, 9] = BOS_ID  # a document start inside a row: the dense forward attends across it
    hessians = ref.collect_hessians(model, FixedBatches(torch, x), h, "cpu", n_calibration_batches=2)
    dims = sorted({H.shape[0] for H in hessians.values()})
    probes = rng.standard_normal((max(dims), 3)).astype(np.float32)
    out = {"hess/x": x, "hess/probes": probes}
    for name, H in hessians.items():
        H = H.numpy().astype(np.float64)
        out[f"hess/{name}/diag"] = np.diag(H).astype(np.float32)
        out[f"hess/{name}/probe"] = (H @ probes[:H.shape[0]]).astype(np.float32)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    args = parser.parse_args()
    ref = import_reference(args.reference, ENV)
    import torch
    torch.manual_seed(0)
    rng = np.random.default_rng(20)
    W16, X = gptq_inputs(rng)
    arrays = {"W": W16, "X": X, **gptq_fixtures(ref, torch, W16, X), **gate_fixtures(ref, torch, rng),
              **hessian_fixtures(ref, torch, rng)}
    path = HERE / "quant_frontier_tiny.npz"
    np.savez_compressed(path, **arrays)
    names = sorted({k.split("/")[1] for k in arrays if k.startswith("hess/") and k.count("/") == 2})
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB): {len(names)} Hessians, "
          f"LQER error {arrays['lqer/recon_err']:.6f}")


if __name__ == "__main__":
    main()
