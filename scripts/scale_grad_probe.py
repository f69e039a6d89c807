"""CPU probe (docs/fidelity.md, "The scales' gradients"): each parameter group's gradient of a
small bf16 model against the same model computed in float32, with model.scales_in_float32 off
(op-by-op bf16 rounding) and on (the fused float32 form of torch.compile). Prints the relative
error and the sign flips of each group. Usage: PYTHONPATH=. python scripts/scale_grad_probe.py"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from golf_jax import model
from golf_jax.config import ModelConfig


def main() -> None:
    cfg = ModelConfig(vocab_size=1024, num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
                      compute_dtype="bfloat16", attention_impl="jnp", mlp_impl="jnp", bigram_vocab_size=512,
                      bigram_dim=64, ve_dim=32, ve_layers="2,3", xsa_last_n=4, rope_dims=16)
    params = model.init_params(cfg, jax.random.key(0))
    noise = lambda a: (a.astype(jnp.float32) + 0.02 * jax.random.normal(jax.random.key(1), a.shape)).astype(a.dtype)  # noqa: E731
    params = jax.tree.map(noise, params)  # away from the init's zeros and ones
    tokens = jax.random.randint(jax.random.key(2), (4, 1024), 0, cfg.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    grad = jax.jit(jax.grad(model.loss), static_argnums=1)
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    truth = flat(grad(params, dataclasses.replace(cfg, compute_dtype="float32"), tokens, targets))
    for in_float32 in (False, True):
        got = flat(grad(params, dataclasses.replace(cfg, scales_in_float32=in_float32), tokens, targets))
        print(f"scales_in_float32={in_float32}")
        for name, want in truth.items():
            if want.size <= 4096 or "bank" in name:
                rel = np.linalg.norm(got[name] - want) / (np.linalg.norm(want) + 1e-30)
                flips = int(np.sum(np.sign(got[name]) != np.sign(want)))
                print(f"  {name:40s} relative error {rel:.4f}  sign flips {flips}/{want.size}")


if __name__ == "__main__":
    main()
