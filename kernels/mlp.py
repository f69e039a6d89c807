"""The MLP y = (leaky_relu(x W_up^T, slope)^2) W_down^T with a fused
up-projection + activation and a fused activation backward.

Forward: one kernel computes pre = x W_up^T (bf16 in, fp32 accumulation,
rounded to bf16 as a bf16 matmul's output is) and act = leaky_relu(pre)^2 in
its epilogue, writing act, and pre only when a backward will need it; XLA's
cuBLAS GEMM then computes act W_down^T. Neither pre nor act makes a separate
round trip through memory for the activation.

Backward (`jax.custom_vjp`): one kernel computes dact = dy W_down and, in its
epilogue, dpre = dact * d act/d pre from the saved pre, and recomputes act for
W_down's gradient. So the forward saves only x and pre for the backward, not
act and the activation's intermediates as autodiff of the jnp path does. The
three remaining gradient GEMMs (dW_down = dy^T act, dx = dpre W_up,
dW_up = dpre^T x) are XLA's.

Rounding follows the jnp path (and the reference's bf16 autocast): pre, the
leaky value, act, dact and each product are rounded to bf16 where a bf16
tensor op would round them; d(l^2)/dl is 2 * bf16(dact * l), exactly what
autodiff of l * l gives in bf16.

Each kernel is one `custom_partitioning` op: under GSPMD a row-sharded batch
runs on each device's rows (weights replicated) instead of being gathered.

`impl`: "triton" runs the kernels of `kernels.mlp_triton` (GPU, bf16);
"reference" runs the same functions in jnp (any backend, any float dtype), so
the custom_vjp wiring is testable on a CPU; "jnp" is plain autodiff of the
jnp expression (the model's default off GPUs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.partition import row_partitioned

IMPLS = ("jnp", "reference", "triton")


# ----------------------------------------------------------------------------- jnp references

def leaky_squared(pre: jax.Array, slope: float) -> jax.Array:
    """The activation in pre's dtype: leaky_relu(pre, slope)^2."""
    return jnp.square(jax.nn.leaky_relu(pre, slope))


def up_act_reference(x_MxK: jax.Array, w_up_NxK: jax.Array, slope: float,
                     save_pre: bool) -> tuple[jax.Array, jax.Array | None]:
    """(act, pre or None): what the forward kernel writes."""
    pre = jnp.einsum("mk,nk->mn", x_MxK, w_up_NxK)
    return leaky_squared(pre, slope), (pre if save_pre else None)


def down_grad_reference(dy_MxO: jax.Array, w_down_OxN: jax.Array, pre_MxN: jax.Array,
                        slope: float) -> tuple[jax.Array, jax.Array]:
    """(dpre, act): what the backward kernel writes."""
    dact = jnp.einsum("mo,on->mn", dy_MxO, w_down_OxN)
    leaky = jax.nn.leaky_relu(pre_MxN, slope)
    dleaky = 2 * (dact * leaky)  # autodiff of leaky * leaky: dact*leaky + leaky*dact
    dpre = jnp.where(pre_MxN >= 0, dleaky, slope * dleaky)
    return dpre, leaky * leaky


def mlp_jnp(x: jax.Array, w_up: jax.Array, w_down: jax.Array, slope: float) -> jax.Array:
    """The unfused MLP, differentiated by autodiff (the reference's expression)."""
    act = leaky_squared(jnp.einsum("...k,nk->...n", x, w_up), slope)
    return jnp.einsum("...n,on->...o", act, w_down)


# ----------------------------------------------------------------------------- dispatch

def triton_available() -> bool:
    """A GPU backend with jax-triton importable."""
    if jax.default_backend() != "gpu":
        return False
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_supports(model_dim: int, hidden_dim: int) -> bool:
    """The Triton kernels load 16-byte vectors along rows (jax-triton assumes
    16-byte aligned buffers), so every bf16 row length must be a multiple of 8."""
    return model_dim % 8 == 0 and hidden_dim % 8 == 0


def _kernels(impl: str):
    if impl == "triton":
        from kernels import mlp_triton  # needs triton and jax-triton: GPU only
        return mlp_triton.up_act, mlp_triton.down_grad
    if impl == "reference":
        return up_act_reference, down_grad_reference
    raise ValueError(f"no MLP kernels named {impl!r}; expected one of {IMPLS}")


@functools.lru_cache(maxsize=None)
def _partitioned_kernels(impl: str, slope: float):
    """The kernels of `impl` for one slope, each row-partitioned."""
    up_act, down_grad = _kernels(impl)
    up_infer = row_partitioned(lambda x, w: up_act(x, w, slope, save_pre=False)[0], (0,), 1,
                                "m k, n k -> m n", ("k", "n"))
    up_train = row_partitioned(lambda x, w: up_act(x, w, slope, save_pre=True), (0,), 2,
                                "m k, n k -> m n, m n", ("k", "n"))
    down = row_partitioned(lambda dy, w, pre: down_grad(dy, w, pre, slope), (0, 2), 2,
                            "m o, o n, m n -> m n, m n", ("o", "n"))
    return up_infer, up_train, down


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_mlp(x_MxK, w_up_NxK, w_down_OxN, slope: float, impl: str):
    up_infer, _, _ = _partitioned_kernels(impl, slope)
    return jnp.einsum("mn,on->mo", up_infer(x_MxK, w_up_NxK), w_down_OxN)


def _fused_mlp_fwd(x_MxK, w_up_NxK, w_down_OxN, slope, impl):
    _, up_train, _ = _partitioned_kernels(impl, slope)
    act, pre = up_train(x_MxK, w_up_NxK)
    return jnp.einsum("mn,on->mo", act, w_down_OxN), (x_MxK, w_up_NxK, w_down_OxN, pre)


def _fused_mlp_bwd(slope, impl, residuals, dy_MxO):
    x_MxK, w_up_NxK, w_down_OxN, pre_MxN = residuals
    _, _, down = _partitioned_kernels(impl, slope)
    dpre, act = down(dy_MxO, w_down_OxN, pre_MxN)
    dw_down = jnp.einsum("mo,mn->on", dy_MxO, act)
    dx = jnp.einsum("mn,nk->mk", dpre, w_up_NxK)
    dw_up = jnp.einsum("mn,mk->nk", dpre, x_MxK)
    return dx, dw_up, dw_down


_fused_mlp.defvjp(_fused_mlp_fwd, _fused_mlp_bwd)


def mlp(x: jax.Array, w_up_NxK: jax.Array, w_down_OxN: jax.Array, slope: float, impl: str = "jnp") -> jax.Array:
    """leaky_relu(x W_up^T, slope)^2 W_down^T over x's last axis, in x's dtype
    (the weights must already be in it).

    impl "triton" needs bf16; the kernels take 2-D row-major operands, so x's
    leading axes are flattened into rows.
    """
    if impl == "jnp":
        return mlp_jnp(x, w_up_NxK, w_down_OxN, slope)
    if impl == "triton" and not triton_available():
        raise ValueError("the Triton MLP kernels need a GPU and jax-triton (pip install -e '.[gpu]'); "
                         f"backend {jax.default_backend()!r} (set model.mlp_impl='jnp' or 'auto')")
    if impl == "triton" and not triton_supports(x.shape[-1], w_up_NxK.shape[0]):
        raise ValueError(f"the Triton MLP kernels need model and hidden sizes divisible by 8, got "
                         f"{x.shape[-1]} and {w_up_NxK.shape[0]} (set model.mlp_impl='jnp')")
    if impl == "triton" and x.dtype != jnp.bfloat16:
        raise ValueError(f"the Triton MLP kernels take bfloat16 inputs, got {x.dtype} "
                         "(set model.mlp_impl='jnp' for other dtypes)")
    lead = x.shape[:-1]
    y = _fused_mlp(x.reshape(-1, x.shape[-1]), w_up_NxK, w_down_OxN, float(slope), impl)
    return y.reshape(*lead, w_down_OxN.shape[0])
