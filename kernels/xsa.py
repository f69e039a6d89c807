"""XSA ("exclusive self attention") as one Pallas kernel forward and one backward.

XSA removes from each attention head's output y its component along the unit
value vector of its KV group at the same position:

    vn = v / max(|v|, 1e-12)          (F.normalize, per KV head)
    out = y - (y . vn) vn             (per query head; head h uses KV head h // G)

Why kernels: XLA runs the jnp expression with its autodiff backward as ~6
fusions per layer moving ~1.2 GB per layer for a 48 x 2048 micro-batch (the
float32 unit vectors, projections and their cotangents round-trip through
memory): 4.4 ms per micro-batch on an H200. The forward kernel reads y
[N, H*D] and v [N, K*D] once and writes out once (~0.25 GB in bf16 at that
size); the backward reads dout, y and v once and writes dy and dv once
(~0.4 GB). The forward saves only y and v, in their own dtype, for the
backward, which recomputes vn and the projections in registers.

Rounding points are xsa_reference's: v and y go to float32; norm, vn, the
projection `along` and the difference stay float32; out is rounded once to
y's dtype. The backward is the hand-derived gradient of that float32
computation (the formulas are at `_backward_kernel`), rounded once to y's
dtype (dy) and v's dtype (dv), where autodiff's convert backward rounds.
Only the summation order differs (and, on the GPU, Triton's fused
multiply-adds); sqrt and the divisions are correctly rounded on the GPU too
(PTX sqrt.rn / div.rn, as XLA emits them, where Triton's own would be
approximate).

With a gate (the 1.0611 record's sparse head-output gate, golf_jax.layers.head_gate:
g [N, H] float32, one weight a head and position), out is gated in the same
kernel, as the reference computes it (`gated_reference`): XSA's float32 result
times g, rounded once. In the reference XSA's result is float32 (F.normalize's
norm is a float32 op under autocast, and the rest promotes), the gate multiplies
it in float32, and the out-projection's autocast rounds the product. Apart, XSA's
kernel writes its result rounded and the gate (an XLA fusion, which cannot fuse
into a Pallas call's output) reads it back: one more rounding than the
reference's, and one more read and write of the [N, H*D] output each way
(docs/performance.md). The backward takes the gated output's cotangent c and
forms XSA's own, c g, and g's, the sum over D of c times XSA's result, both in
float32 (recomputed, unrounded), as autodiff of `gated_reference` does.

`impl`: "jnp" is autodiff of `xsa_reference`; "pallas" is a jax.custom_vjp
whose forward and backward are each one pallas_call: Pallas's Triton backend
on GPUs, its interpreter elsewhere (that is how the CPU tests check the kernel
code itself). Each pallas_call is row-partitioned (kernels/partition.py):
under GSPMD a row-sharded batch runs the kernels on each device's rows.

Blocks: the grid is (row blocks, KV heads) over the 2-D row-major views (the
reshapes are free). Program (i, kv) takes KV head kv's [rows, D] tile of v and
the [rows, G*D] tile of its G = H/K query heads in y, dout, out and dy (head
h = kv*G + g: a group's heads are contiguous columns), and writes dv for that
KV head only: the group's heads are all in the program, so dv needs no
reduction across programs. Why: with all H heads of a block in one program,
the backward needed 168 registers a thread at 64 rows (sm_90), too few
resident warps to hide the memory latency (~1.3 TB/s on an H200); a program
of one group holds a K-th of the values (see TUNED for the counts). Triton
loads only power-of-two tiles, so each head is its own static [rows, D]
column slice of the group's tile (D a power of two). Rows per block, warps and
stages are TUNED's, read when the kernels are built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.partition import row_partitioned

IMPLS = ("jnp", "pallas")
XSA_NORM_EPS = 1e-12  # F.normalize's clamp of the value vector's norm
# Launch parameters of each pallas_call on the GPU, read when the kernels are
# built; block_rows is an upper bound (see block_rows). Registers a thread for
# sm_90 (Triton 3.6's ptxas, no spills), forward / backward: 64 rows, 4 warps
# 70 / 146; 64 rows, 8 warps 40 / 78; 128 rows, 4 warps 128 / 254; 128 rows,
# 8 warps 70 / 148. They go with the [rows, D] float32 values a thread holds,
# rows * D / (32 * warps) per tile: 64 rows of 8 warps is the fewest with
# blocks of at least 64 rows (all loads 16-byte vectors either way). One
# stage: there is no loop inside a kernel for the software pipeliner to stage.
# Measured on an H200 (scripts/fusion_kernel_sweep.py, docs/performance.md),
# forward+backward at 48 x 2048: 32 rows of 4 warps 0.875 ms, 64 rows of 8
# warps 1.037 ms, the fastest and the slowest of eight configs.
TUNED = {"forward": dict(block_rows=32, num_warps=4, num_stages=1),
         "backward": dict(block_rows=32, num_warps=4, num_stages=1)}
# Below this many rows a block makes the interpreter's grid loop long for
# nothing: interpret mode, which has no power-of-two rule, takes all rows at once.
MIN_INTERPRET_BLOCK_ROWS = 8


# ----------------------------------------------------------------------------- jnp reference

def xsa_reference(y_BxTxHxD: jax.Array, v_BxTxKxD: jax.Array) -> jax.Array:
    """XSA: remove from each head's output its component along the unit value
    vector of its KV group at the same position.

    In float32 whatever the inputs, returned in y's dtype: under the
    reference's autocast F.normalize is a float32 op, so the unit vector, the
    projection and the difference are float32 until the out-projection.
    """
    return _xsa_float32(y_BxTxHxD, v_BxTxKxD).astype(y_BxTxHxD.dtype)


def gated_reference(y_BxTxHxD: jax.Array, v_BxTxKxD: jax.Array, g_BxTxH: jax.Array) -> jax.Array:
    """XSA's float32 result, each head times its gate weight g (float32), rounded once
    to y's dtype: the reference's XSA and sparse head gate before its out-projection."""
    return (_xsa_float32(y_BxTxHxD, v_BxTxKxD) * g_BxTxH[..., None]).astype(y_BxTxHxD.dtype)


def _xsa_float32(y_BxTxHxD: jax.Array, v_BxTxKxD: jax.Array) -> jax.Array:
    B, T, H, D = y_BxTxHxD.shape
    K = v_BxTxKxD.shape[2]
    vf = v_BxTxKxD.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(vf * vf, axis=-1, keepdims=True))
    vn_BxTxKx1xD = (vf / jnp.maximum(norm, XSA_NORM_EPS))[:, :, :, None, :]
    y_BxTxKxGxD = y_BxTxHxD.reshape(B, T, K, H // K, D).astype(jnp.float32)
    along = jnp.sum(y_BxTxKxGxD * vn_BxTxKx1xD, axis=-1, keepdims=True)
    return (y_BxTxKxGxD - along * vn_BxTxKx1xD).reshape(B, T, H, D)


# ----------------------------------------------------------------------------- the kernels

def _sqrt(x: jax.Array, exact: bool) -> jax.Array:
    """Correctly rounded float32 sqrt: PTX sqrt.rn where `exact` (Pallas's
    sqrt compiles to sqrt.approx under Triton 3.6), jnp's otherwise."""
    if not exact:
        return jnp.sqrt(x)
    return pltriton.elementwise_inline_asm("sqrt.rn.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def divide(a: jax.Array, b: jax.Array, exact: bool) -> jax.Array:
    """Correctly rounded float32 a / b (b broadcast to a's shape): PTX div.rn
    where `exact` (Triton 3.6 lowers `/` to the 2-ulp div.full), jnp's otherwise.
    Shared with kernels/softcap_ce.py."""
    b = jnp.broadcast_to(b, a.shape)
    if not exact:
        return a / b
    return pltriton.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]


def _unit_value(v_ref, exact: bool):
    """(vn, norm, max(norm, eps)) of the program's KV head tile, float32, as xsa_reference computes them."""
    vf = v_ref[...].astype(jnp.float32)
    norm = _sqrt(jnp.sum(vf * vf, axis=1, keepdims=True), exact)
    clamped = jnp.maximum(norm, XSA_NORM_EPS)
    return divide(vf, clamped, exact), norm, clamped


def _forward_kernel(y_ref, v_ref, *refs, group: int, head_dim: int, exact: bool):
    """One KV head's rows: y_ref/out_ref [rows, G*D] (its G query heads), v_ref [rows, D];
    gated: refs = (g_ref [rows, G] float32, out_ref), else (out_ref,)."""
    *gate, out_ref = refs
    vn, _, _ = _unit_value(v_ref, exact)
    for g in range(group):
        cols = slice(g * head_dim, (g + 1) * head_dim)
        yf = y_ref[:, cols].astype(jnp.float32)
        along = jnp.sum(yf * vn, axis=1, keepdims=True)
        out = yf - along * vn
        if gate:
            out = out * gate[0][:, g:g + 1]
        out_ref[:, cols] = out.astype(out_ref.dtype)


def _backward_kernel(dout_ref, y_ref, v_ref, *refs, group: int, head_dim: int, exact: bool):
    """The gradient of out = y - (y . vn) vn, vn = v / max(|v|, eps), float32:

        dy  = dout - (dout . vn) vn
        dvn = sum over the group's heads of  -(y . vn) dout - (dout . vn) y
        dv  = (dvn - (vn . dvn) vn) / |v|     where |v| > eps
              dvn / eps                        elsewhere (the clamp is constant)

    Autodiff of xsa_reference gives the same but at two points: at |v| == eps
    exactly jnp.maximum's gradient is split half and half (measure zero; the
    kernel takes the clamp branch), and at v == 0 it is NaN (sqrt's
    derivative 0.5 / 0 times a zero cotangent). There vn = 0, so dvn = 0 and
    the kernel's dv is 0, which is PyTorch's value (its norm's subgradient at
    0 is 0).

    One KV head's rows, as the forward's: all G heads of the group are here,
    so the program's dv tile is complete. Gated (refs = g_ref, dy_ref, dv_ref,
    dg_ref; else dy_ref, dv_ref), dout_ref holds the gated output's cotangent c:
    dg = sum over D of c out (out XSA's float32 result, recomputed) and dout = c g,
    float32.
    """
    gated = len(refs) == 4
    g_ref, dy_ref, dv_ref, dg_ref = refs if gated else (None, *refs, None)
    vn, norm, clamped = _unit_value(v_ref, exact)
    dvn = jnp.zeros_like(vn)
    for g in range(group):
        cols = slice(g * head_dim, (g + 1) * head_dim)
        yf = y_ref[:, cols].astype(jnp.float32)
        doutf = dout_ref[:, cols].astype(jnp.float32)
        along = jnp.sum(yf * vn, axis=1, keepdims=True)
        if gated:
            dg_ref[:, g:g + 1] = jnp.sum(doutf * (yf - along * vn), axis=1, keepdims=True)
            doutf = doutf * g_ref[:, g:g + 1]
        dout_along = jnp.sum(doutf * vn, axis=1, keepdims=True)
        dy_ref[:, cols] = (doutf - dout_along * vn).astype(dy_ref.dtype)
        dvn = dvn - along * doutf - dout_along * yf
    tangential = dvn - vn * jnp.sum(vn * dvn, axis=1, keepdims=True)
    dvf = divide(jnp.where(norm > XSA_NORM_EPS, tangential, dvn), clamped, exact)
    dv_ref[...] = dvf.astype(dv_ref.dtype)


def block_rows(n_rows: int, max_rows: int, interpret: bool) -> int:
    """Rows per program: the largest power of two up to max_rows dividing
    n_rows (so the blocks tile the rows exactly, with no masking). In the
    interpreter, where tiles need not be powers of two, a ragged n_rows whose
    largest such divisor is tiny is one block of all its rows."""
    if max_rows < 1 or max_rows & (max_rows - 1):
        raise ValueError(f"block_rows must be a power of two, got {max_rows}")
    rows = int(np.gcd(n_rows, max_rows))
    return n_rows if interpret and rows < MIN_INTERPRET_BLOCK_ROWS else rows


def _call(kernel, inputs: list[jax.Array], out_shapes: list[jax.ShapeDtypeStruct], kv_heads: int,
          launch: tuple[tuple[str, int], ...], **static):
    """pallas_call of `kernel` over (row blocks, KV heads) of 2-D [rows, width]
    operands: each operand's width is K equal column blocks (v: one head each,
    y: a group's G heads each), and program (i, kv) gets block kv of every one."""
    interpret = jax.default_backend() != "gpu"
    launch = dict(launch)
    n_rows = inputs[0].shape[0]
    rows = block_rows(n_rows, launch["block_rows"], interpret)

    def spec(width: int) -> pl.BlockSpec:
        return pl.BlockSpec((rows, width // kv_heads), lambda i, kv: (i, kv))

    params = None if interpret else pltriton.CompilerParams(num_warps=launch["num_warps"],
                                                            num_stages=launch["num_stages"])
    call = pl.pallas_call(functools.partial(kernel, exact=not interpret, **static), out_shape=out_shapes,
                          grid=(n_rows // rows, kv_heads), in_specs=[spec(x.shape[1]) for x in inputs],
                          out_specs=[spec(s.shape[1]) for s in out_shapes], interpret=interpret,
                          compiler_params=params, name=kernel.__name__.strip("_"))
    return call(*inputs)


def _launch(kind: str) -> tuple[tuple[str, int], ...]:
    """TUNED[kind] as a hashable key for _kernels' cache."""
    return tuple(sorted(TUNED[kind].items()))


@functools.lru_cache(maxsize=None)
def _kernels(heads: int, kv_heads: int, head_dim: int, forward_launch: tuple, backward_launch: tuple,
             gated: bool = False):
    """The forward and backward for one head layout and launch configuration
    (_launch's), each row-partitioned (every operand and output is row-sharded;
    nothing is replicated). gated: with the gate g [N, H] as the last input,
    and its gradient as the backward's last output."""
    static = dict(kv_heads=kv_heads, group=heads // kv_heads, head_dim=head_dim)
    gate_spec = ", m c" if gated else ""

    def forward(y_NxHD, v_NxKD, *gate):
        return _call(_forward_kernel, [y_NxHD, v_NxKD, *gate], [jax.ShapeDtypeStruct(y_NxHD.shape, y_NxHD.dtype)],
                     launch=forward_launch, **static)[0]

    def backward(dout_NxHD, y_NxHD, v_NxKD, *gate):
        outs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (y_NxHD, v_NxKD, *gate)]
        return tuple(_call(_backward_kernel, [dout_NxHD, y_NxHD, v_NxKD, *gate], outs, launch=backward_launch,
                           **static))

    operands = 3 if gated else 2  # y, v (and g); the backward takes dout too and gives a gradient of each
    return (row_partitioned(forward, tuple(range(operands)), 1, f"m a, m b{gate_spec} -> m a", ()),
            row_partitioned(backward, tuple(range(operands + 1)), operands,
                            f"m a, m a, m b{gate_spec} -> m a, m b{gate_spec}", ()))


def _layout(y_NxHD: jax.Array, v_NxKD: jax.Array, head_dim: int, gated: bool = False) -> tuple:
    """_kernels' arguments: the head layout, TUNED's launch parameters now, and the gate."""
    return (y_NxHD.shape[1] // head_dim, v_NxKD.shape[1] // head_dim, head_dim, _launch("forward"),
            _launch("backward"), gated)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_xsa(y_NxHD: jax.Array, v_NxKD: jax.Array, g_NxH: jax.Array | None, head_dim: int) -> jax.Array:
    """The kernels' XSA of y and v, gated by g_NxH (float32) unless it is None."""
    forward, _ = _kernels(*_layout(y_NxHD, v_NxKD, head_dim, gated=g_NxH is not None))
    return forward(y_NxHD, v_NxKD, *([] if g_NxH is None else [g_NxH]))


def _fused_xsa_fwd(y_NxHD, v_NxKD, g_NxH, head_dim):
    # The residuals are the inputs themselves (bf16 in training): nothing float32 is saved but g.
    return _fused_xsa(y_NxHD, v_NxKD, g_NxH, head_dim), (y_NxHD, v_NxKD, g_NxH)


def _fused_xsa_bwd(head_dim, residuals, dout_NxHD):
    y_NxHD, v_NxKD, g_NxH = residuals
    _, backward = _kernels(*_layout(y_NxHD, v_NxKD, head_dim, gated=g_NxH is not None))
    if g_NxH is None:
        return (*backward(dout_NxHD.astype(y_NxHD.dtype), y_NxHD, v_NxKD), None)
    return backward(dout_NxHD.astype(y_NxHD.dtype), y_NxHD, v_NxKD, g_NxH)


_fused_xsa.defvjp(_fused_xsa_fwd, _fused_xsa_bwd)


# ----------------------------------------------------------------------------- dispatch

def xsa(y_BxTxHxD: jax.Array, v_BxTxKxD: jax.Array, impl: str = "jnp",
        gate_BxTxH: jax.Array | None = None) -> jax.Array:
    """xsa_reference's value and gradient, through `impl` ("jnp" or "pallas");
    with gate_BxTxH (float32), gated_reference's.

    y: [B, T, H, D] attention output; v: [B, T, K, D] values, H a multiple of
    K. The Pallas kernels need D, and with a gate H / K, to be powers of two
    (Triton's tiles).
    """
    if impl == "jnp":
        if gate_BxTxH is None:
            return xsa_reference(y_BxTxHxD, v_BxTxKxD)
        return gated_reference(y_BxTxHxD, v_BxTxKxD, gate_BxTxH)
    if impl != "pallas":
        raise ValueError(f"no XSA kernels named {impl!r}; expected one of {IMPLS}")
    B, T, H, D = y_BxTxHxD.shape
    K = v_BxTxKxD.shape[2]
    if v_BxTxKxD.shape != (B, T, K, D) or H % K:
        raise ValueError(f"XSA needs y [B, T, H, D] and v [B, T, K, D] with H a multiple of K, "
                         f"got {y_BxTxHxD.shape} and {v_BxTxKxD.shape}")
    if D & (D - 1):
        raise ValueError(f"the Pallas XSA kernels need a power-of-two head dim (Triton tiles), got {D} "
                         "(set model.fusion_impl='jnp')")
    y_NxHD, v_NxKD = y_BxTxHxD.reshape(B * T, H * D), v_BxTxKxD.reshape(B * T, K * D)
    g_NxH = None
    if gate_BxTxH is not None:
        G = H // K
        if gate_BxTxH.shape != (B, T, H) or G & (G - 1):
            raise ValueError(f"the gated XSA kernels need a gate [B, T, H] = {(B, T, H)} and a power-of-two "
                             f"H / K, got {gate_BxTxH.shape} and {G}")
        g_NxH = gate_BxTxH.reshape(B * T, H).astype(jnp.float32)
    return _fused_xsa(y_NxHD, v_NxKD, g_NxH, D).reshape(B, T, H, D)
