"""The record's optimizer: Muon for the four weight banks, AdamW for the rest,
one global gradient-norm clip before both, and the learning-rate multiplier
(warmdown) that scales every group.

Each piece is an optax GradientTransformation, so the whole is
`optax.chain(clip, optax.multi_transform({...}, labels))`, Muon itself is
`optax.chain(scale_by_muon, add_decayed_weights, scale_by_learning_rate)`, and
AdamW the same chain around `scale_by_adam`. Every piece computes in float32
and rounds where the reference's PyTorch rounds (docs/fidelity.md): JAX would
otherwise round a Python-float coefficient to bf16 before using it on a bf16
array (a learning rate of 0.035 becomes 0.03491).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from golf_jax.config import OptimizerConfig, ScheduleConfig
from golf_jax.layers import rounding_to
from golf_jax.param_tree import EMBEDDING_KEYS, Params, path_name

BANK_KEYS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz (a, b, c), every step
# The 1.0611 record's Polar Express minimax tuples (a, b, c), one per step. Asked
# for more than five steps it still runs these five (its slice guard).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ROW_NORM_EPS = 1e-7
NS_EPS = 1e-7
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------- Muon

def ns_coefficients(name: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each Newton-Schulz step (optimizer.muon_ns_coefficients)."""
    if name == "quintic":
        return (NS_COEFFS,) * steps
    if name == "polar_express":
        return POLAR_EXPRESS_COEFFS[:steps]
    raise ValueError(f"unknown Newton-Schulz coefficients {name!r}")


def newton_schulz(g: jax.Array, steps: int = 5, dtype=jnp.bfloat16, coefficients: str = "quintic",
                  rounding: str = "eager") -> jax.Array:
    """Orthogonalise each matrix of a batch [..., rows, cols] by the iteration
    X <- a X + (b A + c A^2) X, A = X X^T, from X / ||X||_F. Returns `dtype`.

    Computed in float32 and rounded with `rounding_to`: bf16 arithmetic in JAX
    would round each Python scalar too (3.4445 -> 3.4375, which shrank the
    output by 2.7%, docs/fidelity.md), where PyTorch multiplies in float32.

    Where it rounds to `dtype` (optimizer.muon_ns_rounding): "eager" after each
    product, scaling and sum, as the record's uncompiled PyTorch does; "compiled"
    once per matmul and once per fused elementwise expression (b A + c A^2,
    a X + B X, X / (||X|| + eps)), as the kernels of the 1.0611 record's
    @torch.compile'd function do (Inductor computes a fused expression in float32
    and rounds what it stores; the norm, a reduction, is stored rounded).
    """
    rnd = rounding_to(dtype)
    fused = rounding == "compiled"
    step_rnd = (lambda x: x) if fused else rnd  # the roundings inside a fused expression
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None

    def mm(x, y):  # operands are `dtype` values; products accumulate in float32
        return rnd(jnp.matmul(x.astype(dtype), y.astype(dtype), precision=precision,
                              preferred_element_type=jnp.float32))

    x = rnd(g.astype(jnp.float32))
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = jnp.swapaxes(x, -1, -2)
    norm = rnd(jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)))
    x = rnd(x / step_rnd(norm + NS_EPS))
    for a, b, c in ns_coefficients(coefficients, steps):
        A = mm(x, jnp.swapaxes(x, -1, -2))
        B = rnd(step_rnd(b * A) + step_rnd(c * mm(A, A)))
        x = rnd(step_rnd(a * x) + mm(B, x))
    return (jnp.swapaxes(x, -1, -2) if transposed else x).astype(dtype)


def normalize_rows(u: jax.Array, rnd: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """u / ||row||_2 (clamped at 1e-7), the norm in float32, as the 1.0611 record's
    eager `update / update.float().norm(dim=-1).clamp_min(1e-7).to(update.dtype)`."""
    norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(u), axis=-1, keepdims=True)), ROW_NORM_EPS)
    return rnd(u / rnd(norm))


class ScaleByMuonState(NamedTuple):
    count: jax.Array
    momentum: Any  # the momentum buffer of each bank, in momentum_dtype


def _value(v: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return v(count) if callable(v) else jnp.asarray(v, jnp.float32)


def scale_by_muon(momentum: ScalarOrSchedule, nesterov: bool = True, ns_steps: int = 5,
                  momentum_dtype=jnp.bfloat16, ns_dtype=jnp.bfloat16, ns_coefficients: str = "quintic",
                  ns_rounding: str = "eager", row_normalize: bool = False) -> optax.GradientTransformation:
    """Muon's direction for banks of matrices [n, rows, cols], float32:
    max(1, rows/cols)^0.5 NewtonSchulz(u), each matrix orthogonalised alone,

        buf = momentum * buf + g;  u = g + momentum * buf (nesterov) or buf.

    reference quirk: the gradient is cast to bf16 and the buffer and the
    iteration stay bf16 (momentum_dtype, ns_dtype); float32 is better.
    row_normalize: u's rows scaled to unit norm before Newton-Schulz (the 1.0611 record).
    """
    momentum_dtype, ns_dtype = jnp.dtype(momentum_dtype), jnp.dtype(ns_dtype)
    rnd = rounding_to(momentum_dtype)

    def init_fn(params):
        return ScaleByMuonState(jnp.zeros([], jnp.int32),
                                jax.tree.map(lambda p: jnp.zeros(p.shape, momentum_dtype), params))

    def update_fn(updates, state, params=None):
        del params
        mom = _value(momentum, state.count)

        def one(g, buf):
            # As the reference's in-place bf16 ops round: g.bfloat16();
            # buf.mul_(m).add_(g) (twice); g.add(buf, alpha=m) (once).
            g = rnd(g.astype(jnp.float32))
            buf = rnd(rnd(mom * buf.astype(jnp.float32)) + g)
            u = rnd(g + mom * buf) if nesterov else buf
            if row_normalize:
                u = normalize_rows(u, rnd)
            rows, cols = g.shape[-2], g.shape[-1]
            scale = max(1.0, rows / cols) ** 0.5
            o = newton_schulz(u, ns_steps, ns_dtype, ns_coefficients, ns_rounding)
            return scale * o.astype(jnp.float32), buf.astype(momentum_dtype)

        out = jax.tree.map(one, updates, state.momentum)
        directions = jax.tree.map(lambda _, o: o[0], updates, out)
        bufs = jax.tree.map(lambda _, o: o[1], updates, out)
        return directions, ScaleByMuonState(optax.safe_increment(state.count), bufs)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(learning_rate: ScalarOrSchedule, momentum: ScalarOrSchedule, nesterov: bool = True, ns_steps: int = 5,
         weight_decay: float = 0.0, momentum_dtype=jnp.bfloat16, ns_dtype=jnp.bfloat16,
         ns_coefficients: str = "quintic", ns_rounding: str = "eager", row_normalize: bool = False) -> optax.GradientTransformation:
    """Muon: p <- p - lr (wd p + max(1, rows/cols)^0.5 O), its decoupled weight
    decay scaled by the learning rate as the reference's p.mul_(1 - lr wd)."""
    return optax.chain(scale_by_muon(momentum, nesterov, ns_steps, momentum_dtype, ns_dtype, ns_coefficients,
                                     ns_rounding, row_normalize),
                       optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


# ----------------------------------------------------------------------------- AdamW

def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's direction m_hat / (sqrt(v_hat) + eps), computed as torch's fused
    Adam computes it: every value loaded into float32 (whatever the dtype of the
    parameter, gradient and moments), the arithmetic in float32, the moments
    stored back in their own dtype, rounded once per step.

    reference quirk: the moments live in each parameter's dtype, as the
    reference's `zeros_like(param)` states do: bf16 for the bf16 embedding tables. The
    direction comes back float32, so the learning rate and the decay are
    applied to it unrounded and the parameter is rounded once, in the training
    step, as the fused kernel stores it. (optax's scale_by_adam on a bf16
    table computes in bf16: b1 = 0.9 becomes 0.8984, b2 = 0.95 becomes 0.9492,
    and the learning rate 0.035 becomes 0.03491, a 0.25% shorter step of every
    table on every step; docs/fidelity.md, "first-step gap".) The state is
    optax's ScaleByAdamState, so optimizer states keep their layout.
    """
    f32 = jnp.float32

    def init_fn(params):
        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros(params), zeros(params))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(f32)
        bc1 = 1 - jnp.asarray(b1, f32) ** t
        bc2_sqrt = jnp.sqrt(1 - jnp.asarray(b2, f32) ** t)

        def one(g, m, v):
            g = g.astype(f32)
            m32 = b1 * m.astype(f32) + (1 - b1) * g
            v32 = b2 * v.astype(f32) + (1 - b2) * (g * g)
            return m32 / bc1 / (jnp.sqrt(v32) / bc2_sqrt + eps), m32.astype(m.dtype), v32.astype(v.dtype)

        out = jax.tree.map(one, updates, state.mu, state.nu)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)  # noqa: E731
        return pick(0), optax.ScaleByAdamState(count, pick(1), pick(2))

    return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights(weight_decay: float) -> optax.GradientTransformation:
    """update + weight_decay * param, in float32 (optax's would multiply a bf16
    parameter by the decay in bf16, rounding 0.04 to 0.04004 and the product)."""

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("add_decayed_weights needs the parameters")
        return jax.tree.map(lambda u, p: u.astype(jnp.float32) + weight_decay * p.astype(jnp.float32),
                            updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def adamw(learning_rate: ScalarOrSchedule, b1: float, b2: float, eps: float,
          weight_decay: float = 0.0) -> optax.GradientTransformation:
    """torch.optim.AdamW(fused=True): p <- p - lr (wd p + m_hat / (sqrt(v_hat) + eps)),
    in float32 with one rounding of the parameter (see scale_by_adam). With
    weight_decay 0 it is torch.optim.Adam(fused=True). The same state layout as
    optax.adamw's."""
    return optax.chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


# ----------------------------------------------------------------------------- clipping

def clip_by_global_norm(max_norm: float, axis_name: str | None = None,
                        is_sharded: Callable[[str], bool] = lambda name: False) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: multiply by min(1, max_norm / (norm + 1e-6)).

    As the reference runs it on a GPU (reference quirks, both measured with
    scripts/torch_bf16_scalar_probe.py): each tensor's norm is computed in
    float32 and returned in the tensor's dtype (torch._foreach_norm: a bf16
    table's norm is rounded to bf16), then the norm of those norms in float32;
    and a bf16 gradient is multiplied by the coefficient rounded to bf16 (CUDA
    casts the float32 0-dim coefficient to the gradient's dtype; torch on the
    CPU would not). Inside shard_map, leaves for which `is_sharded(name)` holds
    are disjoint slices across `axis_name` (their squares summed over it); the
    others are replicated.
    """

    def update_fn(updates, state, params=None):
        del params
        leaves = jax.tree_util.tree_leaves_with_path(updates)
        sq = [jnp.sum(jnp.square(g.astype(jnp.float32))) for _, g in leaves]
        sharded = [axis_name is not None and is_sharded(path_name(path)) for path, _ in leaves]
        if any(sharded):
            summed = iter(jax.lax.psum(jnp.stack([s for s, sh in zip(sq, sharded) if sh]), axis_name))
            sq = [next(summed) if sh else s for s, sh in zip(sq, sharded)]
        norms = [rounding_to(g.dtype)(jnp.sqrt(s)) for s, (_, g) in zip(sq, leaves)]
        norm = jnp.sqrt(sum(jnp.square(n) for n in norms)) if norms else jnp.float32(0)
        coef = jnp.minimum(max_norm / (norm + CLIP_EPS), 1.0)
        return jax.tree.map(lambda g: (g * rounding_to(g.dtype)(coef)).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


# ----------------------------------------------------------------------------- the record's optimizer

def param_group(name: str) -> str:
    """Which optimizer group a parameter belongs to, by its path in the params tree."""
    if name in BANK_KEYS:
        return "muon"
    if name in EMBEDDING_KEYS:
        return "embed"
    if name == "lm_head":
        return "head"
    return "scalar"


def param_labels(params: Params) -> Params:
    return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path_name(path)), params)


def muon_momentum_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from muon_momentum_warmup_start to muon_momentum over the first steps."""
    if cfg.muon_momentum_warmup_steps <= 0:  # optax's linear schedule would stay at its start
        return optax.constant_schedule(cfg.muon_momentum)
    if cfg.muon_momentum_warmup_exact:
        return exact_momentum_warmup(cfg.muon_momentum_warmup_start, cfg.muon_momentum,
                                     cfg.muon_momentum_warmup_steps)
    return optax.linear_schedule(cfg.muon_momentum_warmup_start, cfg.muon_momentum, cfg.muon_momentum_warmup_steps)


def exact_momentum_warmup(start: float, end: float, steps: int) -> optax.Schedule:
    """The reference's momentum at step s (its step_fn, before the update):
    f = min(s / steps, 1), (1 - f) start + f end in double, then float32 (torch's
    arithmetic on the Python float). A table of the steps + 1 values, indexed by
    the update count: the device computes in float32 and would round otherwise."""
    table = jnp.asarray([(1 - min(s / steps, 1.0)) * start + min(s / steps, 1.0) * end for s in range(steps + 1)],
                        jnp.float32)
    return lambda count: table[jnp.minimum(count, steps)]


def build_optimizer(cfg: OptimizerConfig, axis_name: str | None = None) -> optax.GradientTransformation:
    """clip(0.3) -> {banks: Muon, embedding tables: AdamW 0.035, the rest: AdamW 0.025,
    an untied head: Adam 0.008}.

    Learning rates here are the base rates: the training step multiplies the
    resulting update by the warmdown multiplier, which scales every group's
    rate and, with it, its decoupled weight decay, as the reference does.
    """
    adam = lambda lr, wd: adamw(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.adam_eps, weight_decay=wd)  # noqa: E731
    groups = {
        "muon": muon(cfg.matrix_lr, muon_momentum_schedule(cfg), nesterov=True, ns_steps=cfg.muon_backend_steps,
                     weight_decay=cfg.muon_weight_decay, momentum_dtype=cfg.muon_momentum_dtype,
                     ns_dtype=cfg.muon_ns_dtype, ns_coefficients=cfg.muon_ns_coefficients,
                     ns_rounding=cfg.muon_ns_rounding, row_normalize=cfg.muon_row_normalize),
        "embed": adam(cfg.tied_embed_lr, cfg.embed_weight_decay),
        "scalar": adam(cfg.scalar_lr, cfg.adam_weight_decay),
        "head": adam(cfg.head_lr, 0.0),  # an untied head: the reference's torch.optim.Adam, no decay
    }
    return optax.chain(clip_by_global_norm(cfg.grad_clip_norm, axis_name, is_sharded=lambda n: n in BANK_KEYS),
                       optax.multi_transform(groups, param_labels))


def lr_multiplier(step: int, elapsed_s: float, cfg: ScheduleConfig) -> float:
    """The reference's warmdown multiplier of every learning rate.

    With a wall-clock cap the warmdown covers the last `warmdown_iters` steps
    as estimated from the mean step time so far; without one, the last
    `warmdown_iters` iterations, linearly. Not an optax schedule: it is a
    function of the wall clock, decided on the host (by process 0 in a
    multi-process run) and passed to the step, which scales every group's
    update by it.
    """
    if cfg.warmdown_frac > 0:
        return fraction_lr_multiplier(step, elapsed_s, cfg)
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cfg.max_wallclock_seconds <= 0:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        if start <= step < cfg.iterations:
            return max((cfg.iterations - step) / max(cfg.warmdown_iters, 1), 0.0)
        return 1.0
    step_s = elapsed_s / max(step, 1)
    warmdown_s = cfg.warmdown_iters * step_s
    remaining_s = max(cfg.max_wallclock_seconds - elapsed_s, 0.0)
    return remaining_s / max(warmdown_s, 1e-12) if remaining_s <= warmdown_s else 1.0


def training_fraction(step: int, elapsed_s: float, cfg: ScheduleConfig) -> float:
    """The 1.0611 record's training fraction: the elapsed share of the wall-clock
    cap, or without one the share of the iterations done before this step."""
    if cfg.max_wallclock_seconds > 0:
        return elapsed_s / cfg.max_wallclock_seconds
    return step / max(cfg.iterations, 1)


def training_schedule(cfg: ScheduleConfig) -> ScheduleConfig:
    """The schedule the training loop follows: with a cap and
    gptq_reserve_seconds, the cap less the reserve (as the 1.0611 record's
    max_wallclock_ms: its stop, its fraction and so its multiplier and loop
    switch all aim at 599.5 s)."""
    if cfg.gptq_reserve_seconds > 0 and cfg.max_wallclock_seconds > 0:
        return dataclasses.replace(cfg, max_wallclock_seconds=cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds)
    return cfg


def fraction_lr_multiplier(step: int, elapsed_s: float, cfg: ScheduleConfig) -> float:
    """The 1.0611 record's multiplier: 1 until the training fraction f reaches
    1 - warmdown_frac, then max((1 - f) / warmdown_frac, min_lr_mult)."""
    frac = training_fraction(step, elapsed_s, cfg)
    if frac >= 1.0 - cfg.warmdown_frac:
        return max((1.0 - frac) / cfg.warmdown_frac, cfg.min_lr_mult)
    return 1.0

