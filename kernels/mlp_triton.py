"""Triton kernels of `kernels.mlp`: importable wherever triton is installed
(`compile_ptx` builds them for Hopper on a machine without a GPU); running them
needs a GPU and jax-triton.

Both kernels are one GEMM tile loop (`_matmul_tile`: bf16 operands, fp32
accumulation, grouped tile order for L2 reuse of the activation rows) with an
elementwise epilogue:

  up_act      pre = x W_up^T      -> act = leaky_relu(pre)^2 [, pre]
  down_grad   dact = dy W_down    -> dpre = dact * act'(pre), act (recomputed)

Operands are 2-D row-major. Block sizes are tuned offline, by the sweep of
`scripts/mlp_kernel_sweep.py` on an H100 at the record's shapes (98,304 x 512
x 1536 per device micro-step, 65,536-row evaluation batches), and fixed in
`TUNED`: not by jax-triton's autotuner, which would compile every candidate per
call site and time them at the first execution inside the running program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl


def _config(bm, bn, bk, stages, warps, persistent=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PERSISTENT": persistent},
                         num_stages=stages, num_warps=warps)


# The sweep's winners on an H100 (docs/performance.md), persistent grids for
# every use: 128x256 tiles for the forward (0.379 ms saving pre, 0.291 ms
# without, at 98,304 rows; 0.199 ms at 65,536), 128x128 for the backward
# (0.550 ms). Both are valid for any shape (ragged tiles are masked).
TUNED = {
    "up_act": _config(128, 256, 64, 4, 8, persistent=True),
    "down_grad": _config(128, 128, 64, 3, 8, persistent=True),
}
# Every config the sweep (scripts/mlp_kernel_sweep.py) times.
SWEEP_CONFIGS = [
    _config(bm, bn, 64, stages, 8, persistent)
    for bm, bn in ((128, 128), (128, 256))
    for stages in (3, 4)
    for persistent in (False, True)
] + [_config(128, 128, 128, 3, 8, False), _config(128, 128, 128, 3, 8, True),
     _config(128, 128, 64, 4, 4, True), _config(256, 128, 64, 3, 8, True)]


@triton.jit
def _tile_coords(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile -> (pid_m, pid_n) in groups of GROUP_M row blocks, for L2 reuse."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _matmul_tile(a_ptr, b_ptr, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(acc [BLOCK_M, BLOCK_N] fp32 of A B for one tile, its row and column offsets)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns wrap around instead of being masked in the
    # loop; they are never stored.
    offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if K % BLOCK_K == 0:  # the record's shapes: no masks in the loop
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc, offs_m, offs_n


@triton.jit
def _store(ptr, offs, mask, value, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptr + offs, value)
    else:
        tl.store(ptr + offs, value, mask=mask)


@triton.jit
def _leaky(pre, SLOPE: tl.constexpr):
    """leaky_relu of fp32 values holding bf16 ones, rounded to bf16 as a bf16 op would."""
    return tl.where(pre >= 0, pre, pre * SLOPE).to(tl.bfloat16).to(tl.float32)


@triton.jit
def _up_act_tile(tile_id, x_ptr, w_ptr, act_ptr, pre_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                 SLOPE: tl.constexpr, SAVE_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # x [M, K], w [N, K]: B[k, n] = w[n, k].
    EVEN: tl.constexpr = (M % BLOCK_M == 0) and (N % BLOCK_N == 0)
    pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, offs_m, offs_n = _matmul_tile(x_ptr, w_ptr, pid_m, pid_n, M, N, K, K, 1, 1, K, BLOCK_M, BLOCK_N, BLOCK_K)
    pre = acc.to(tl.bfloat16)
    leaky = _leaky(pre.to(tl.float32), SLOPE)
    out = offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    _store(act_ptr, out, mask, (leaky * leaky).to(tl.bfloat16), EVEN)
    if SAVE_PRE:
        _store(pre_ptr, out, mask, pre, EVEN)


@triton.jit
def _down_grad_tile(tile_id, dy_ptr, w_ptr, pre_ptr, dpre_ptr, act_ptr, M: tl.constexpr, N: tl.constexpr,
                    K: tl.constexpr, SLOPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # dy [M, K], w_down [K, N] (out = K, in = N): B = w_down as stored.
    EVEN: tl.constexpr = (M % BLOCK_M == 0) and (N % BLOCK_N == 0)
    pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, offs_m, offs_n = _matmul_tile(dy_ptr, w_ptr, pid_m, pid_n, M, N, K, K, 1, N, 1, BLOCK_M, BLOCK_N, BLOCK_K)
    dact = acc.to(tl.bfloat16).to(tl.float32)
    out = offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if EVEN:
        pre = tl.load(pre_ptr + out).to(tl.float32)
    else:
        pre = tl.load(pre_ptr + out, mask=mask, other=0.0).to(tl.float32)
    leaky = _leaky(pre, SLOPE)
    dleaky = (dact * leaky).to(tl.bfloat16).to(tl.float32) * 2.0
    dpre = tl.where(pre >= 0, dleaky, dleaky * SLOPE)
    _store(dpre_ptr, out, mask, dpre.to(tl.bfloat16), EVEN)
    _store(act_ptr, out, mask, (leaky * leaky).to(tl.bfloat16), EVEN)


# The kernels: a program per tile, or (PERSISTENT) NUM_SMS programs walking
# the tiles in one flattened loop, which Triton software-pipelines across
# tiles (the next tile's loads start during this tile's epilogue). The two
# entry points have the same shape; the tile functions they call do not
# share an argument list, so they stay two.
@triton.jit
def up_act_kernel(x_ptr, w_ptr, act_ptr, pre_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                  SLOPE: tl.constexpr, SAVE_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr, NUM_SMS: tl.constexpr):
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
            _up_act_tile(tile_id, x_ptr, w_ptr, act_ptr, pre_ptr, M, N, K, SLOPE, SAVE_PRE,
                         BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _up_act_tile(tl.program_id(0), x_ptr, w_ptr, act_ptr, pre_ptr, M, N, K, SLOPE, SAVE_PRE,
                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def down_grad_kernel(dy_ptr, w_ptr, pre_ptr, dpre_ptr, act_ptr, M: tl.constexpr, N: tl.constexpr,
                     K: tl.constexpr, SLOPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr, NUM_SMS: tl.constexpr):
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
            _down_grad_tile(tile_id, dy_ptr, w_ptr, pre_ptr, dpre_ptr, act_ptr, M, N, K, SLOPE,
                            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _down_grad_tile(tl.program_id(0), dy_ptr, w_ptr, pre_ptr, dpre_ptr, act_ptr, M, N, K, SLOPE,
                        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or 132)  # 132: an H100 SXM's


def _grid(M, N):
    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, meta["NUM_SMS"]) if meta["PERSISTENT"] else tiles,)
    return grid


def _check(name, *arrays):
    for a in arrays:
        if a.dtype != jnp.bfloat16 or a.ndim != 2:
            raise ValueError(f"{name}: expected 2-D bfloat16 operands, got {a.dtype} {a.shape}")


def _launch(config: triton.Config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def up_act(x_MxK: jax.Array, w_up_NxK: jax.Array, slope: float, save_pre: bool,
           config: triton.Config | None = None):
    """(act, pre or None), as `kernels.mlp.up_act_reference`; config: another
    block configuration than TUNED's (the sweep)."""
    import jax_triton as jt

    _check("up_act", x_MxK, w_up_NxK)
    (M, K), N = x_MxK.shape, w_up_NxK.shape[0]
    out = jax.ShapeDtypeStruct((M, N), jnp.bfloat16)
    # Without save_pre, pre's output is a 1-element placeholder the kernel
    # never writes (jax-triton's kernels take a fixed argument list).
    pre_shape = out if save_pre else jax.ShapeDtypeStruct((1,), jnp.bfloat16)
    act, pre = jt.triton_call(x_MxK, w_up_NxK, kernel=up_act_kernel, out_shape=(out, pre_shape),
                              grid=_grid(M, N), name="mlp_up_act", M=M, N=N, K=K, SLOPE=float(slope),
                              SAVE_PRE=bool(save_pre), NUM_SMS=num_sms(), **_launch(config or TUNED["up_act"]))
    return act, (pre if save_pre else None)


def down_grad(dy_MxO: jax.Array, w_down_OxN: jax.Array, pre_MxN: jax.Array, slope: float,
              config: triton.Config | None = None):
    """(dpre, act), as `kernels.mlp.down_grad_reference`."""
    import jax_triton as jt

    _check("down_grad", dy_MxO, w_down_OxN, pre_MxN)
    (M, O), N = dy_MxO.shape, w_down_OxN.shape[1]
    out = jax.ShapeDtypeStruct((M, N), jnp.bfloat16)
    return jt.triton_call(dy_MxO, w_down_OxN, pre_MxN, kernel=down_grad_kernel, out_shape=(out, out),
                          grid=_grid(M, N), name="mlp_down_grad", M=M, N=N, K=O, SLOPE=float(slope),
                          NUM_SMS=num_sms(), **_launch(config or TUNED["down_grad"]))


# The pointer arguments of each kernel, in order (what jax-triton passes: the
# inputs, then the outputs).
POINTERS = {up_act_kernel: ("x_ptr", "w_ptr", "act_ptr", "pre_ptr"),
            down_grad_kernel: ("dy_ptr", "w_ptr", "pre_ptr", "dpre_ptr", "act_ptr")}


def compile_ptx(kernel, config: triton.Config, arch: int = 90, **constants) -> triton.compiler.CompiledKernel:
    """Compile a kernel for an sm_`arch` GPU on any machine (no GPU needed),
    with the assumptions jax-triton makes at run time (16-byte aligned bf16
    buffers): catches compile errors and shows the code (PTX in .asm["ptx"])
    before any device time is spent."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    consts = {**constants, **config.kwargs}
    signature = {name: "*bf16" for name in POINTERS[kernel]}
    signature.update({name: "constexpr" for name in consts})
    aligned = {(i,): backend.parse_attr("D") for i in range(len(POINTERS[kernel]))}
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=aligned)
    return triton.compile(source, target=target,
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})
