"""One optimizer step, data parallel over a device mesh, as the reference
trains the record.

One step is one jitted `shard_map` over the mesh axis "data": each device
accumulates the gradient of its micro-batches (`micro_batches_per_step //
n_devices` of them, so every device count sees the same global batch and token
stream), non-bank gradients are averaged across devices, and the four Muon
banks follow the reference's Parallel Muon: their gradients are
reduce-scattered along the bank axis (padded to a multiple of the device
count), each device runs momentum and Newton-Schulz on its slice, and the
updates are all-gathered. AdamW runs replicated. Then the EMA (and SWA).
Late QAT fake-quantises the chosen weights in the forward pass. The 1.0611
record's packed rows (their documents as segment ids) and depth recurrence (a
static `looping`, so two programs at most) go to the model as it takes them.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from golf_jax import model, optim, packing
from golf_jax.config import Config, ConfigError
from golf_jax.param_tree import Params, path_name

AXIS = "data"
QAT_SMALL = ("bigram/proj", "ve/proj")  # the record's late-QAT scope
QAT_LEVELS = (-32, 31)  # int6 fake-quantisation range of the reference's QAT


class TrainState(NamedTuple):
    params: Params
    opt_state: Any
    ema: Params  # float32, every step
    swa: Params | None  # float32 running sum, only with schedule.swa_enabled
    swa_count: jax.Array


# ----------------------------------------------------------------------------- QAT

def fake_quantize_int6(w: jax.Array) -> jax.Array:
    """Straight-through int6 fake quantisation per output row: scale =
    max(amax / 31, 1 / 31), values rounded and clamped to [-32, 31]."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=-1, keepdims=True)
    # reference quirk: the step has a floor of 1/31, so rows whose largest
    # weight is under 1 all get that step.
    scale = jnp.maximum(amax / 31.0, 1.0 / 31.0)
    q = (jnp.clip(jnp.round(w32 / scale), *QAT_LEVELS) * scale).astype(w.dtype)
    return w + jax.lax.stop_gradient(q - w)


def apply_qat(params: Params, scope: str, enabled: jax.Array) -> Params:
    """Fake-quantise the weights in `scope` when `enabled` (a traced bool, so
    switching QAT on never recompiles): "small" the bigram and VE projections
    (the record's CastedLinears), "all" the banks too, "none" nothing (the
    record as it runs: see ScheduleConfig.qat_scope)."""
    names = {"none": (), "small": QAT_SMALL, "all": QAT_SMALL + optim.BANK_KEYS}[scope]

    def one(path, w):
        return jnp.where(enabled, fake_quantize_int6(w), w) if path_name(path) in names else w

    return jax.tree_util.tree_map_with_path(one, params)


# ----------------------------------------------------------------------------- mesh and state

def make_mesh(n_devices: int = 0, local: bool = False) -> jax.sharding.Mesh:
    """The data-parallel mesh: the first n devices (all by default).

    Training (local=False): every process's devices, for the shard_map step;
    with several processes n must be all of them. The stages after training
    (local=True) run in process 0 alone, on its own devices, with Auto axes:
    their jitted functions are written for one device and XLA's partitioner
    splits them along the sharded batch.
    """
    devices = jax.local_devices() if local else jax.devices()
    n = n_devices or len(devices)
    if n > len(devices):
        raise ConfigError(f"run.num_devices: {n} requested, {len(devices)} available")
    if local:
        return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(f"run.num_devices: {n} of the {len(devices)} devices of {jax.process_count()} processes; "
                          f"a multi-process run uses all of them (0)")
    return jax.make_mesh((n,), (AXIS,), devices=devices[:n])


def local_ranks(mesh: jax.sharding.Mesh) -> list[int]:
    """The data ranks (mesh positions) of this process's devices: the spans of
    the token stream it loads."""
    me = jax.process_index()
    return [r for r, d in enumerate(mesh.devices.flat) if d.process_index == me]


def _is_bank(path) -> bool:
    """Whether a path in params, gradients or optimizer state leads to a Muon bank."""
    return any(getattr(k, "key", None) in optim.BANK_KEYS for k in path)


def pad_banks(tree: Params, n: int) -> Params:
    """Zero-pad each bank's leading axis to a multiple of n (Parallel Muon)."""
    def pad(path, x):
        if not _is_bank(path):
            return x
        extra = -x.shape[0] % n
        return jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1)) if extra else x
    return jax.tree_util.tree_map_with_path(pad, tree)


def state_specs(state: TrainState) -> TrainState:
    """Partition specs: the Muon momentum of the banks is split along the bank
    axis, everything else replicated."""
    def spec(path, x):
        return P(AXIS) if _is_bank(path) and getattr(x, "ndim", 0) >= 1 else P()
    return TrainState(jax.tree.map(lambda _: P(), state.params),
                      jax.tree_util.tree_map_with_path(spec, state.opt_state),
                      jax.tree.map(lambda _: P(), state.ema),
                      None if state.swa is None else jax.tree.map(lambda _: P(), state.swa), P())


def init_state(params: Params, tx: optax.GradientTransformation, mesh, swa: bool) -> TrainState:
    # Copies, never aliases: the step donates every buffer of the state.
    f32 = lambda t: jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), t)  # noqa: E731
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # the caller's arrays stay valid
    state = TrainState(params, tx.init(pad_banks(params, mesh.size)), f32(params),
                       jax.tree.map(jnp.zeros_like, f32(params)) if swa else None, jnp.zeros([], jnp.int32))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state))
    return jax.device_put(state, shardings)


@jax.jit
def finite_flags(params: Params) -> jax.Array:
    """One bool per parameter tensor: all of it finite. Computed for the
    parameters entering every step and read only when that step's loss is not
    finite: a step that goes bad spreads NaN into every tensor through the
    gradients, so only the state before it can name the culprit. One fused
    reduction per step, left on the device."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])


def non_finite_names(params: Params, flags) -> list[str]:
    names = [path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    return [name for name, ok in zip(names, np.asarray(flags)) if not ok]


# ----------------------------------------------------------------------------- the step

def parallel_update(tx: optax.GradientTransformation, grad_sum: Params, opt_state, params: Params, n: int,
                    accum: int) -> tuple[Params, Any]:
    """One device's optimizer update inside shard_map over AXIS (n devices),
    from its sum of `accum` micro-batch gradients: Parallel Muon.

    Banks are reduce-scattered along their bank axis, so each device updates
    (and keeps the momentum of) its own 1/n of the matrices; then the updates
    are all-gathered. Everything else is all-reduced and updated everywhere.
    """
    def reduce(path, g, p):
        if _is_bank(path):
            g = jax.lax.psum_scatter(g, AXIS, scatter_dimension=0, tiled=True) / (n * accum)
        else:
            g = jax.lax.pmean(g, AXIS) / accum
        return g.astype(p.dtype)

    padded = pad_banks(params, n)
    grads = jax.tree_util.tree_map_with_path(reduce, pad_banks(grad_sum, n), padded)
    me = jax.lax.axis_index(AXIS)

    def local_slice(path, p):
        if not _is_bank(path):
            return p
        k = p.shape[0] // n
        return jax.lax.dynamic_slice_in_dim(p, me * k, k, axis=0)

    updates, opt_state = tx.update(grads, opt_state, jax.tree_util.tree_map_with_path(local_slice, padded))

    def gather(path, u, p):
        return jax.lax.all_gather(u, AXIS, axis=0, tiled=True)[:p.shape[0]] if _is_bank(path) else u

    return jax.tree_util.tree_map_with_path(gather, updates, params), opt_state


def make_train_step(cfg: Config, mesh, tx: optax.GradientTransformation, template: TrainState):
    """jit(shard_map(one optimizer step)); the state is donated. Called as

        step(state, xs, ys, lr_mult, qat_on, swa_collect, segments=None, looping=False)

    segments: packed rows' documents (packing.Segments, [accum, rows, ...]
    as xs) or None; looping (static): the depth recurrence's order, a second
    program (at most two: the loop switch never recompiles).
    """
    mcfg, n = cfg.model, mesh.size
    accum = cfg.data.micro_batches_per_step // n
    decay = cfg.schedule.ema_decay
    scope = cfg.schedule.qat_scope
    f32 = jnp.float32
    # reference quirk ("param"): micro-batch gradients summed, and averaged over
    # devices, in each parameter's dtype (bf16 for the embedding tables).
    in_param_dtype = cfg.optimizer.grad_accum_dtype == "param"

    def loss_fn(params, x, y, qat_on, segments, looping):
        return model.loss(apply_qat(params, scope, qat_on), mcfg, x, y, looping=looping,
                          **packing.model_inputs(segments))

    grad_fn = jax.value_and_grad(loss_fn)

    def device_step(state: TrainState, xs, ys, lr_mult, qat_on, swa_collect, segments, *, looping: bool):
        params = state.params

        def micro(carry, batch):
            gsum, lsum = carry
            x, y, segs = batch
            loss, g = grad_fn(params, x, y, qat_on, segs, looping)
            return (jax.tree.map(lambda a, b: a + b.astype(a.dtype), gsum, g), lsum + loss), None

        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype if in_param_dtype else f32), params),
                 jnp.zeros([], f32))
        (gsum, lsum), _ = jax.lax.scan(micro, zeros, (xs, ys, segments))
        loss = jax.lax.pmean(lsum / accum, AXIS)
        updates, opt_state = parallel_update(tx, gsum, state.opt_state, params, n, accum)
        # The warmdown multiplier scales every group's rate and decoupled decay.
        params = jax.tree.map(lambda p, u: (p.astype(f32) + lr_mult * u.astype(f32)).astype(p.dtype), params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p.astype(f32), state.ema, params)
        swa, swa_count = state.swa, state.swa_count
        if swa is not None:
            swa = jax.tree.map(lambda s, p: jnp.where(swa_collect, s + p.astype(f32), s), swa, params)
            swa_count = swa_count + swa_collect.astype(jnp.int32)
        return TrainState(params, opt_state, ema, swa, swa_count), loss

    specs = state_specs(template)

    def step(state, xs, ys, lr_mult, qat_on, swa_collect, segments=None, looping=False):
        # Replication of the outputs holds by construction (every replicated value
        # comes out of a pmean, psum or all_gather); JAX's static check cannot see
        # through all_gather in every version, so it is off. Nothing here is
        # differentiated through a collective, which is what the check guards.
        sharded = jax.shard_map(functools.partial(device_step, looping=looping), mesh=mesh,
                                in_specs=(specs, P(None, AXIS), P(None, AXIS), P(), P(), P(), P(None, AXIS)),
                                out_specs=(specs, P()), check_vma=False)
        return sharded(state, xs, ys, lr_mult, qat_on, swa_collect, segments)

    return jax.jit(step, donate_argnums=0, static_argnames="looping")
