"""Which dtype each tensor of the PyTorch reference has under its bf16 autocast
on a GPU: one forward and backward of a 2-layer record-shaped model, every
aten op logged with its input and output dtypes (a TorchDispatchMode sees the
ops after autocast's casts), then each parameter's gradient dtype.

This is what golf_jax's mixed precision (model.residual_dtype, the logits'
rounding, the gradient accumulation dtype) is checked against; the findings
are in docs/fidelity.md.

    python scripts/reference_dtype_probe.py --reference .shared/reference/record_1019 > probe.txt
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from reference_setup import cast_as_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", default="../shared/reference/record_1019")
    parser.add_argument("--device", default="cuda", help="cpu runs the same code under CPU autocast (other op lists)")
    args = parser.parse_args()
    sys.path.insert(0, args.reference)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    import train_gpt as R  # the reference, unchanged

    model = R.GPT(vocab_size=1024, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=3,
                  tie_embeddings=True, tied_embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0,
                  qk_gain_init=1.5, bigram_vocab_size=3072, bigram_dim=112, xsa_last_n=2, rope_dims=16,
                  ln_scale=True, ve_enabled=True, ve_dim=128, ve_layers="1").to(args.device)
    model = cast_as_main(R, model)
    print("param dtypes:", {n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters()
                            if p.dtype != torch.float32})

    seen = Counter()

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            dt = lambda xs: ",".join(str(a.dtype).removeprefix("torch.")  # noqa: E731
                                     for a in tree_flatten(xs)[0] if isinstance(a, torch.Tensor))
            line = f"{func} ({dt(args)}) -> ({dt(out)})"
            if not seen[line]:
                print(f"  {phase}: {line}")
            seen[line] += 1
            return out

    x = torch.randint(0, 1024, (2, 64), device=args.device)
    y = torch.randint(0, 1024, (2, 64), device=args.device)
    phase = "forward"
    with Log():
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16):
            loss = model(x, y)
        phase = "backward"
        (loss * 0.125).backward()
    print("grad dtypes:", {n: str(p.grad.dtype).removeprefix("torch.") for n, p in model.named_parameters()
                           if p.grad is not None})
    print("torch", torch.__version__)


if __name__ == "__main__":
    main()
