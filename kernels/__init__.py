"""GPU kernels (jax-triton and Pallas), each beside a pure-jnp reference of the same function.

`kernels.mlp`: the MLP's up-projection fused with LeakyReLU(slope)^2, and its
backward. The Triton code (`kernels.mlp_triton`) is imported only on a GPU with
jax-triton installed; everywhere else the references run.

Pallas kernels (Triton backend on GPUs, Pallas's interpreter elsewhere), one
pass forward and one backward each, switched by `model.fusion_impl`:
`kernels.qk_norm_rope`: the queries' and keys' RMSNorm, partial RoPE and q_gain.
`kernels.residual_norm`: a residual mix with the RMSNorm after it.
`kernels.xsa`: XSA (exclusive self attention).
`kernels.softcap_ce`: the head's softcap with the per-token cross-entropy,
from the pre-softcap logits (opt-in: model.fusion_kernels must name it).

`kernels.partition` makes a kernel an op XLA's SPMD partitioner splits along
its rows.
"""
