"""Where does eager PyTorch round a scalar to bf16 before using it on a bf16
tensor? The reference's optimizer does, on bf16 tensors: Muon's
`buf.mul_(momentum)` and `g.add(buf, alpha=momentum)` (Python floats), and
clip_grad_norm_'s `torch._foreach_mul_(grads, clip_coef)` (a float32 0-dim
tensor on the grads' device). For each op, the fraction of elements equal to
"scalar kept float32, product rounded once" and to "scalar rounded to bf16
first". docs/fidelity.md, "first-step gap".

    python scripts/torch_bf16_scalar_probe.py [--device cuda]
"""
import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dev = ap.parse_args().device
    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(1 << 20, generator=gen) * 1e-3).bfloat16().to(dev)
    b = (torch.randn(1 << 20, generator=gen) * 1e-3).bfloat16().to(dev)
    m, c = 0.92, 0.2025986655
    m16 = float(torch.tensor(m).bfloat16())
    c16 = float(torch.tensor(c).bfloat16())
    gf, bf = g.double(), b.double()

    def report(name, got, exact, rounded):
        got = got.double()
        e = (got == exact.float().bfloat16().double()).float().mean().item()
        r = (got == rounded.float().bfloat16().double()).float().mean().item()
        print(f"{dev} {name}: equal to 'scalar float32, one rounding' {e:.4f}; "
              f"to 'scalar rounded to bf16 first' {r:.4f}")

    report("g.add(b, alpha=0.92)", g.add(b, alpha=m), gf + m * bf, gf + m16 * bf)
    report("b.mul_(0.92)", b.clone().mul_(m), m * bf, m16 * bf)
    coef = torch.tensor(c, dtype=torch.float32, device=dev)
    x = [g.clone()]
    torch._foreach_mul_(x, coef)
    report("_foreach_mul_([bf16], float32 0-dim tensor)", x[0], gf * c, gf * c16)
    report("g.mul_(float32 0-dim tensor)", g.clone().mul_(coef), gf * c, gf * c16)
    n = torch._foreach_norm([g])[0]
    print(f"{dev} _foreach_norm of a bf16 tensor: dtype {n.dtype}")


if __name__ == "__main__":
    main()
