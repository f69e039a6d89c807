"""GPU kernels (jax-triton), each beside a pure-jnp reference of the same function.

`kernels.mlp`: the MLP's up-projection fused with LeakyReLU(slope)^2, and its
backward. The Triton code (`kernels.mlp_triton`) is imported only on a GPU with
jax-triton installed; everywhere else the references run.
"""
