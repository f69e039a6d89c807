"""Training, data parallel over a device mesh, as the reference trains the record.

One optimizer step is one jitted `shard_map` over the mesh axis "data": each
device accumulates the gradient of its micro-batches (`micro_batches_per_step
// n_devices` of them, so every device count sees the same global batch and
token stream), non-bank gradients are averaged across devices, and the four
Muon banks follow the reference's Parallel Muon: their gradients are
reduce-scattered along the bank axis (padded to a multiple of the device
count), each device runs momentum and Newton-Schulz on its slice, and the
updates are all-gathered. AdamW runs replicated. Then the EMA.

The host loop around it reproduces the reference's schedule: warm-up steps
that compile and prime and are then undone, validation at step 0, every
`val_loss_every` steps and at the end (not counted in the wall clock), the
warmdown multiplier from the wall clock, late QAT, SWA, and the 600 s cap.

    python train.py --config configs/smoke.py [--resume] [--config.<field>=<value>]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from golf_jax import checkpoint, compat, config as config_lib, data, datasets, distributed, evaluate, layers, model, optim, param_tree, quantize
from golf_jax.runlog import CompileCounter, RunLog, peak_memory_bytes, plot_curves
from golf_jax.config import Config, ConfigError
from golf_jax.param_tree import Params, path_name

AXIS = "data"
QAT_SMALL = ("bigram/proj", "ve/proj")  # the record's late-QAT scope
QAT_LEVELS = (-32, 31)  # int6 fake-quantisation range of the reference's QAT


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message names the step."""


class TrainingInterrupted(TrainingError):
    """SIGTERM stopped the run at a step boundary, after a complete checkpoint
    of that step was saved; `--resume` continues it exactly."""


# 128 + SIGTERM: what a shell and a batch scheduler report for a process that
# SIGTERM ended, so a pre-empted run reads as pre-empted, not as failed or done.
EXIT_SIGTERM = 128 + signal.SIGTERM


class StopOnSigterm:
    """While active (main thread only: Python delivers signals there), SIGTERM
    sets `requested` instead of killing the process, so the loop can stop at the
    next step boundary with a checkpoint. A second SIGTERM gets the previous
    handler's behaviour back (by default: die now), for a run that is stuck.
    The previous handler is restored on exit: no global state outlives train()."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGTERM, self._previous)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


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

def make_mesh(n_devices: int = 0) -> jax.sharding.Mesh:
    """The data-parallel mesh: the first n devices (all by default). With
    several processes it spans every process's devices, so n must be all."""
    devices = jax.devices()
    n = n_devices or len(devices)
    if n > len(devices):
        raise ConfigError(f"run.num_devices: {n} requested, {len(devices)} available")
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
    """jit(shard_map(one optimizer step)); the state is donated."""
    mcfg, n = cfg.model, mesh.size
    accum = cfg.data.micro_batches_per_step // n
    decay = cfg.schedule.ema_decay
    scope = cfg.schedule.qat_scope
    f32 = jnp.float32
    # reference quirk ("param"): micro-batch gradients summed, and averaged over
    # devices, in each parameter's dtype (bf16 for the embedding tables).
    in_param_dtype = cfg.optimizer.grad_accum_dtype == "param"

    def loss_fn(params, x, y, qat_on):
        return model.loss(apply_qat(params, scope, qat_on), mcfg, x, y)

    grad_fn = jax.value_and_grad(loss_fn)

    def device_step(state: TrainState, xs, ys, lr_mult, qat_on, swa_collect):
        params = state.params

        def micro(carry, xy):
            gsum, lsum = carry
            loss, g = grad_fn(params, xy[0], xy[1], qat_on)
            return (jax.tree.map(lambda a, b: a + b.astype(a.dtype), gsum, g), lsum + loss), None

        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype if in_param_dtype else f32), params),
                 jnp.zeros([], f32))
        (gsum, lsum), _ = jax.lax.scan(micro, zeros, (xs, ys))
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
    # Replication of the outputs holds by construction (every replicated value
    # comes out of a pmean, psum or all_gather); JAX's static check cannot see
    # through all_gather in every version, so it is off. Nothing here is
    # differentiated through a collective, which is what the check guards.
    sharded = jax.shard_map(device_step, mesh=mesh,
                            in_specs=(specs, P(None, AXIS), P(None, AXIS), P(), P(), P()),
                            out_specs=(specs, P()), check_vma=False)
    return jax.jit(sharded, donate_argnums=0)


# ----------------------------------------------------------------------------- data feed

class Prefetcher:
    """Assembles the next optimizer step's micro-batches on a background
    thread and puts them on the devices, so data loading is off the critical
    path. Each item carries the stream cursor after it, for checkpoints."""

    def __init__(self, batches: data.TrainBatches, accum: int, sharding, depth: int = 2):
        self.batches, self.accum, self.sharding = batches, accum, sharding
        self.queue: queue.Queue = queue.Queue(depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stopped.is_set():
                item = next_step_batch(self.batches, self.accum, self.sharding)
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced in the training loop
            self.queue.put(e)

    def next(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=5)


def next_step_batch(batches: data.TrainBatches, accum: int, sharding):
    """One optimizer step's micro-batches as global arrays [accum, rows, seq]
    sharded by rows over the mesh, built from this process's ranks only."""
    micro = [batches.next_micro_batch() for _ in range(accum)]
    xs = np.stack([x for x, _ in micro])
    ys = np.stack([y for _, y in micro])
    return _global_rows(xs, batches, sharding), _global_rows(ys, batches, sharding), batches.state()


def _global_rows(local: np.ndarray, batches: data.TrainBatches, sharding) -> jax.Array:
    rows = batches.local_tokens // batches.seq_len  # per rank
    first = {r: i * rows for i, r in enumerate(batches.ranks)}  # rank -> its first row in `local`
    shape = (local.shape[0], batches.world_size * rows, local.shape[2])

    def block(index):  # the rows of one of this process's devices
        start = index[1].start or 0
        at = first[start // rows]
        return local[:, at:at + (index[1].stop or shape[1]) - start]

    return jax.make_array_from_callback(shape, sharding, block)


# ----------------------------------------------------------------------------- the run

def initial_params(cfg: Config) -> Params:
    if cfg.run.init_from:
        state = compat.load_reference_state(cfg.run.init_from)
        return param_tree.cast_params(compat.params_from_reference(state, cfg.model), cfg.model)
    return model.init_params(cfg.model, jax.random.key(cfg.run.seed))


def check_runnable(cfg: Config, n_devices: int) -> int:
    """Accumulation steps per device; raises ConfigError naming the field."""
    micro = cfg.data.micro_batches_per_step
    if micro % n_devices:
        raise ConfigError(f"data.micro_batches_per_step: {micro} is not divisible by the {n_devices} devices")
    local = cfg.data.train_batch_tokens // micro
    if local % cfg.data.train_seq_len:
        raise ConfigError(f"data.train_batch_tokens: {cfg.data.train_batch_tokens} / {micro} micro-batches is not "
                          f"a whole number of {cfg.data.train_seq_len}-token sequences")
    return micro // n_devices


def _meta(step: int, training_s: float, cursor: dict, qat_on: bool, stop_after: int | None, cfg: Config,
          history: dict, budget: dict | None = None) -> dict:
    # The run's PRNG key is the seed's; training itself draws no random numbers
    # (no dropout), so the key is recorded for what comes after, not consumed.
    key = np.asarray(jax.random.key_data(jax.random.key(cfg.run.seed))).tolist()
    return {"step": step, "training_s": training_s, "cursor": cursor, "qat_on": qat_on, "stop_after_step": stop_after,
            "rng_key": key, "config": config_lib.to_dict(cfg), "history": history, "budget": budget}


def _check_resume_config(saved: dict, cfg: Config, where: Path) -> None:
    now = config_lib.to_dict(cfg)
    for section in ("model", "data", "optimizer"):
        for key, value in now[section].items():
            if saved.get(section, {}).get(key) != value:
                raise checkpoint.CheckpointError(
                    f"{where}: checkpoint was made with {section}.{key}={saved.get(section, {}).get(key)!r}, "
                    f"this run has {value!r}")


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


def checkpoint_bytes(state: TrainState) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def reserve_budget(cfg: Config, params: Params, log: RunLog, saved: dict | None = None) -> dict:
    """Budget mode: how much of the wall-clock cap the stages after training
    need (schedule.quant_reserve_seconds, or timed now on these weights with
    schedule.quant_reserve_margin of headroom), and what is left for training.
    Either way the stages are compiled here, outside the cap, so after training
    they run compiled. `saved`: a resumed run's reserve, kept as it was."""
    sched = cfg.schedule
    t0 = time.perf_counter()
    # Host arrays, as train.main reloads the final model: the same argument
    # types, so what compiles here is what runs after training.
    host = jax.device_get(distributed.local_copy(params))
    if saved is not None:
        quantize.compile_budget_stages(host, cfg)
        log.line(f"budget mode: {saved['reserve_s']:.1f} s reserved as when the run began; training stops at "
                 f"{saved['training_cap_s']:.1f} s (stages compiled in {time.perf_counter() - t0:.1f} s)")
        return saved
    measured: dict[str, float] = {}
    if sched.quant_reserve_seconds > 0:
        quantize.compile_budget_stages(host, cfg)
        reserve, how = sched.quant_reserve_seconds, "configured"
    else:
        measured = quantize.time_budget_stages(host, cfg)
        reserve = sum(measured.values()) * (1 + sched.quant_reserve_margin)
        how = (", ".join(f"{k} {v:.2f} s" for k, v in measured.items())
               + f" measured (+{sched.quant_reserve_margin:.0%})")
    cap = sched.max_wallclock_seconds
    if reserve >= cap:
        raise ConfigError(f"schedule.quant_in_budget: the stages after training need {reserve:.1f} s, "
                          f"the whole wall-clock cap of {cap:.0f} s")
    log.line(f"budget mode: {reserve:.1f} s of the {cap:.0f} s cap reserved for calibration, Hessians and GPTQ "
             f"({how}; compiling{' and timing' if measured else ''} took {time.perf_counter() - t0:.1f} s, "
             f"outside the cap); training stops at {cap - reserve:.1f} s")
    return {"cap_s": cap, "reserve_s": reserve, "measured_s": measured, "training_cap_s": cap - reserve}


def train(cfg: Config, *, resume: bool = False, progress: bool = True, max_steps: int | None = None) -> dict:
    """Run training as configured; returns the summary (also written as JSON).

    `max_steps` stops after that many optimizer steps in this call without
    the end-of-run work (a test hook that stands in for a pre-emption).
    SIGTERM (a real pre-emption) stops at the next step boundary, saves a
    checkpoint of that step and raises `TrainingInterrupted`.
    """
    with StopOnSigterm() as stop:
        return _train(cfg, resume, progress, max_steps, stop)


def _train(cfg: Config, resume: bool, progress: bool, max_steps: int | None, stop: StopOnSigterm) -> dict:
    t_launch = time.perf_counter()
    cfg.validate()
    mesh = make_mesh(cfg.run.num_devices)
    n = mesh.size
    accum = check_runnable(cfg, n)
    primary = distributed.is_primary()
    sched, out_dir = cfg.schedule, Path(cfg.run.output_dir)
    checkpoint.check_writable(out_dir)  # a read-only or missing mount fails now, not at the first save

    # Every input is checked before anything compiles.
    ds = datasets.resolve_dataset(cfg.data.data_dir, cfg.data.tokenizer_path, cfg.data.train_pattern,
                              cfg.data.val_pattern, cfg.model.vocab_size)
    tables = data.byte_tables(data.load_tokenizer(ds.tokenizer, cfg.model.vocab_size), cfg.model.vocab_size)
    val_tokens = data.load_validation_tokens(ds.val_pattern, cfg.eval.eval_seq_len, cfg.model.vocab_size,
                                             cfg.eval.max_val_tokens)
    batches = data.TrainBatches(ds.train_pattern, cfg.model.vocab_size, cfg.data.train_batch_tokens,
                                cfg.data.train_seq_len, world_size=n, accum_steps=accum, ranks=local_ranks(mesh))
    params = initial_params(cfg)

    tx = optim.build_optimizer(cfg.optimizer, AXIS)
    state = init_state(params, tx, mesh, sched.swa_enabled)
    # Room for the checkpoints kept, one being written and the final model, so
    # a full disk is reported before training rather than after it.
    keep = 2
    checkpoint.check_free_space(out_dir, (keep + 1) * checkpoint_bytes(state) + param_tree.param_count(params) * 4)
    ckpts = checkpoint.TrainCheckpoints(out_dir / "checkpoints", keep=keep)
    step, training_s, qat_on, stop_after_step = 0, 0.0, False, None
    history: dict = {"train": [], "val": []}
    saved_at = None  # the step of the last checkpoint this run holds
    budget = None  # budget mode: the time reserved for the stages after training
    if resume:
        _check_resume_config(ckpts.read_meta().get("config", {}), cfg, ckpts.directory)
        state, meta = ckpts.restore(state)
        saved_at = meta["step"]
        step, training_s, qat_on = meta["step"], meta["training_s"], meta["qat_on"]
        stop_after_step, history = meta["stop_after_step"], meta["history"]
        budget = meta.get("budget")
        batches.restore(meta["cursor"])

    step_fn = make_train_step(cfg, mesh, tx, state)
    batch_sharding = NamedSharding(mesh, P(None, AXIS))
    tokens_per_step = cfg.data.train_batch_tokens
    progress = progress and primary
    bar = tqdm(total=sched.iterations, initial=step, unit="step", disable=not progress, dynamic_ncols=True)
    log = RunLog(out_dir, bar if progress else None, active=primary)
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    log.line(f"devices: {n} x {jax.devices()[0].device_kind}{processes}; {accum} micro-batches of "
             f"{tokens_per_step // cfg.data.micro_batches_per_step:,} tokens per device per step; "
             f"{param_tree.param_count(params):,} parameters; compute {jnp.dtype(layers.compute_dtype(cfg.model)).name}, "
             f"attention {layers.attention_impl(cfg.model)}")
    log.line(param_tree.summary(params))

    # Warm-up: real steps compile and prime, then state and stream are restored.
    t_first_step = None
    if sched.warmup_steps > 0:
        initial, cursor0 = jax.tree.map(lambda x: x.copy(), state), batches.state()
        for i in range(sched.warmup_steps):
            xs, ys, _ = next_step_batch(batches, accum, batch_sharding)
            state, loss = step_fn(state, xs, ys, 1.0, False, False)
            if i == 0:
                loss.block_until_ready()
                t_first_step = time.perf_counter() - t_launch
        jax.block_until_ready(state)
        log.line(f"warmup: {sched.warmup_steps} steps; launch to first step {t_first_step:.1f} s")
        if sched.quant_in_budget and primary:
            budget = reserve_budget(cfg, state.params, log, budget)  # on the warm-up's live weights
        state = initial
        batches.restore(cursor0)
    elif sched.quant_in_budget and primary:
        budget = reserve_budget(cfg, state.params, log, budget)

    prefetch = Prefetcher(batches, accum, batch_sharding)
    ckpt_every = cfg.run.checkpoint_every
    if budget is not None:
        # Training gets the cap minus the reserve: the stop and the warmdown
        # (which follows the wall clock) both aim at the earlier end.
        sched = dataclasses.replace(sched, max_wallclock_seconds=budget["training_cap_s"])
    cap = sched.max_wallclock_seconds
    pending = None  # (step, loss array): read one step behind, so the device stays busy
    cursor = batches.state()
    steps0, start_s = step, training_s
    agreement = distributed.StepAgreement()  # process 0's clock decides, with several processes

    def drain() -> None:
        nonlocal pending
        if pending is None:
            return
        s, loss_arr, mult, flags = pending
        pending = None
        value = float(loss_arr)
        agreement.done(s - 1)  # every process has run step s, so each read its decision
        if not math.isfinite(value):
            # Which tensors were already bad when the step began is the lead to
            # the cause (an exploding learning rate, a bad init_from, an overflow).
            bad = non_finite_names(state.params, flags)
            named = (f"non-finite parameters entering it: {', '.join(bad[:8])}"
                     + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")) if bad else \
                "every parameter entering it was finite (the step's own arithmetic overflowed)"
            raise TrainingError(f"loss is {value} at step {s}; {named}; stopping (the last good checkpoint, "
                                f"{'step ' + str(saved_at) if saved_at is not None else 'none yet'}, is kept)")
        history["train"].append((s, value))
        if s % cfg.run.train_log_every == 0 or s <= 10:
            avg_ms = 1000 * training_s_now() / max(s, 1)
            log.line(f"step {s}/{sched.iterations} train_loss {value:.4f} lr_mult {mult:.3f} "
                     f"train_time {training_s_now():.1f}s step_avg {avg_ms:.1f}ms")
            log.record(kind="train", step=s, loss=value, lr_mult=mult, training_s=training_s_now())
        spent = training_s_now()
        step_s = (spent - start_s) / max(s - steps0, 1)
        left = (cap - spent) if cap > 0 else (sched.iterations - s) * step_s
        bar.set_postfix_str(f"loss {value:.3f} {tokens_per_step / max(step_s, 1e-9) / 1e6:.3f}M tok/s "
                            f"lr {mult:.2f} left {max(left, 0):.0f}s")

    def save(at_step: int, at_training_s: float, required: bool = True) -> None:
        """Checkpoint the state. A step's loss judges the parameters entering
        it, not those it leaves: these are checked here, so no checkpoint ever
        holds a NaN. Non-finite: a required save (final, SIGTERM) raises; a
        periodic one is skipped, and the next step's loss error names them."""
        nonlocal saved_at
        if saved_at == at_step:
            return
        bad = non_finite_names(state.params, finite_flags(state.params))
        if bad:
            listed = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            if not required:
                log.line(f"step {at_step}: non-finite parameters ({listed}); checkpoint not saved")
                return
            raise TrainingError(f"non-finite parameters after step {at_step}: {listed}; not saved (the last good "
                                f"checkpoint, {'step ' + str(saved_at) if saved_at is not None else 'none yet'}, "
                                f"is kept)")
        # orbax compiles a slice program per array shape at the first save;
        # that is checkpointing, not the training loop, so it is counted apart.
        with compiles.aside():
            ckpts.save(at_step, state, _meta(at_step, at_training_s, cursor, qat_on, stop_after_step, cfg, history,
                                             budget))
        saved_at = at_step

    def validate(params) -> evaluate.EvalResult | None:
        """Process 0 evaluates its own copy of the replicated weights; the
        others go on to the next step, which waits for it in its collectives."""
        if not primary:
            return None
        return evaluate.run_standard(distributed.local_copy(params), cfg, val_tokens, tables, progress=False)

    closed = False

    def close_outputs() -> None:
        """Wait for the save in flight (raising if it failed), close the logs; once."""
        nonlocal closed
        if closed:
            return
        closed = True
        try:
            ckpts.close()
        finally:
            log.close()

    def interrupted(where: str) -> TrainingInterrupted:
        return TrainingInterrupted(f"stopped by SIGTERM {where}; checkpoint of step {saved_at} saved in "
                                   f"{ckpts.directory}; continue with --resume")

    t0 = time.perf_counter()

    def training_s_now() -> float:
        return training_s + (time.perf_counter() - t0)

    def decide(sigterm: bool) -> dict:
        """This process's decisions for the coming step, from its clock."""
        return {"sigterm": sigterm, "stop_after_step": stop_after_step,
                "mult": optim.lr_multiplier(step, training_s_now(), sched)}

    compiles = CompileCounter().__enter__()
    compiles_at_first_step = None
    try:
        while True:
            # With several processes, process 0's decision (its wall clock, a
            # SIGTERM any process got); with one, this process's own.
            agreed = agreement.decide(step, decide, stop.requested)
            stop_after_step = agreed["stop_after_step"]
            if agreed["sigterm"]:  # a step boundary: the state is whole and its loss known
                drain()
                training_s = training_s_now()
                save(step, training_s)
                log.line(f"SIGTERM at step {step}/{sched.iterations}: saving its checkpoint and stopping")
                close_outputs()  # the checkpoint is complete on disk before the process ends
                raise interrupted(f"at step {step}")
            last = step >= sched.iterations or (stop_after_step is not None and step >= stop_after_step)
            if last or (cfg.eval.val_loss_every > 0 and step % cfg.eval.val_loss_every == 0):
                drain()
                training_s = training_s_now()
                val = validate(state.params)
                if val is not None:
                    history["val"].append((step, val.loss))
                    log.line(f"step {step}/{sched.iterations} val_loss {val.loss:.4f} val_bpb {val.bpb:.4f} "
                             f"train_time {training_s:.1f}s")
                    log.record(kind="val", step=step, loss=val.loss, bpb=val.bpb, training_s=training_s)
                t0 = time.perf_counter()
            if last:
                if stop_after_step is not None and step < sched.iterations:
                    log.line(f"stopping early: wall-clock cap at step {step}/{sched.iterations}")
                break
            if max_steps is not None and step - steps0 >= max_steps:
                drain()
                training_s = training_s_now()
                save(step, training_s)
                close_outputs()
                return {"step": step, "interrupted": True}

            mult = agreed["mult"]
            if not qat_on and sched.late_qat_threshold > 0 and mult < sched.late_qat_threshold:
                qat_on = True
                log.line(f"late QAT on at step {step} (lr_mult {mult:.3f}, scope {sched.qat_scope})")
            swa_collect = sched.swa_enabled and mult < sched.swa_lr_threshold and (step + 1) % sched.swa_every == 0
            xs, ys, cursor = prefetch.next()
            flags = finite_flags(state.params)  # dispatched before the step donates these buffers
            state, loss = step_fn(state, xs, ys, mult, qat_on, swa_collect)
            step += 1
            if compiles_at_first_step is None:
                loss.block_until_ready()
                compiles_at_first_step = compiles.count
            drain()
            pending = (step, loss, mult, flags)
            bar.update(1)
            if cap > 0 and stop_after_step is None:
                now = training_s_now()
                # reference quirk: the cap is checked after a step, so the run
                # ends past it by up to a step. Budget mode must end within it:
                # the step in flight (the device runs one behind the host) ends
                # about one mean step time from now.
                ahead = (now - start_s) / max(step - steps0, 1) if budget is not None else 0.0
                if now + ahead >= cap:
                    stop_after_step = step
            if ckpt_every > 0 and step % ckpt_every == 0:
                drain()  # never save a step whose loss is not known to be finite
                paused = time.perf_counter()
                save(step, training_s_now(), required=step >= sched.iterations)
                t0 += time.perf_counter() - paused  # checkpointing is not training time
    except BaseException as failure:
        # A save in flight completes; nothing after the failure is saved. A
        # failing save is reported as what went wrong, not in place of it.
        try:
            close_outputs()
        except checkpoint.CheckpointError as e:
            if e is not failure:
                failure.add_note(str(e))
        raise
    finally:
        compiles.__exit__()
        prefetch.close()
        bar.close()

    # End of training: EMA (or SWA) weights, their evaluation, the artifacts.
    save(step, training_s)
    if stop.requested:
        close_outputs()
        raise interrupted(f"at the end of training (step {step}), before the final evaluation")
    if not primary:  # the final weights, their evaluation and the reports are process 0's
        close_outputs()
        return {"step": step, "process_index": jax.process_index()}
    mine = distributed.local_copy(state)
    if sched.swa_enabled and int(mine.swa_count) > 0:
        final_f32 = jax.tree.map(lambda s: s / mine.swa_count, mine.swa)
        source = f"SWA of {int(mine.swa_count)} snapshots"
    else:
        final_f32, source = mine.ema, "EMA"
    final = jax.tree.map(lambda f, p: f.astype(p.dtype), final_f32, mine.params)
    final_val = validate(final)
    log.line(f"final ({source}) val_loss {final_val.loss:.4f} val_bpb {final_val.bpb:.4f}")
    checkpoint.save_params(out_dir / "final_model", jax.device_get(final), cfg)

    steps_run = step - steps0
    summary = {
        "steps": step, "training_s": training_s, "tokens_per_s": tokens_per_step * step / max(training_s, 1e-9),
        "step_avg_ms": 1000 * training_s / max(step, 1), "devices": n, "device_kind": jax.devices()[0].device_kind,
        "processes": jax.process_count(),
        "final_weights": source, "final_val_loss": final_val.loss, "final_val_bpb": final_val.bpb,
        "last_val": history["val"][-1] if history["val"] else None,
        "launch_to_first_step_s": t_first_step, "peak_memory_bytes": peak_memory_bytes(),
        # Every XLA compilation after the first optimizer step, in the whole loop
        # (validation and the QAT switch included): 0 is the promise.
        "recompilations_after_first_step": compiles.count - (compiles_at_first_step or 0),
        "checkpoint_compilations": compiles.aside_count,
        "steps_this_run": steps_run,
        "wall_s": time.perf_counter() - t_launch, "stopped_by_wallclock": stop_after_step is not None,
        "budget": budget,
    }
    plot_curves(history["train"], history["val"], out_dir / "loss.png")
    checkpoint.write_json(out_dir / "summary.json", summary)
    log.line(f"{step} steps in {training_s:.1f} s of training ({summary['tokens_per_s'] / 1e6:.3f} M tokens/s); "
             f"final val_bpb {final_val.bpb:.4f}; wrote {out_dir / 'summary.json'}, loss.png, final_model/")
    close_outputs()
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    from golf_jax import cli

    parser = argparse.ArgumentParser(prog="python train.py", description="Train the record model.")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.output_dir")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-quantize", action="store_true",
                        help="stop after training (replay later with python -m golf_jax.quantize)")
    distributed.add_arguments(parser)
    cfg, args = cli.parse(parser, argv)

    try:
        distributed.initialize(args)  # before anything touches a device
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    try:
        summary = train(cfg, resume=args.resume, progress=not args.no_progress)
        if not args.no_quantize and distributed.is_primary():
            # From the saved weights, as a replay reads them: the same artifact either way.
            out_dir = Path(cfg.run.output_dir)
            params, _ = checkpoint.load_params(out_dir / "final_model")
            pre = {"loss": summary["final_val_loss"], "bpb": summary["final_val_bpb"]}
            report = quantize.quantize_and_evaluate(params, cfg, out_dir, progress=not args.no_progress,
                                                    pre_quant=pre, train_summary=summary)
            if "budget" in report:  # budget mode: the summary gets each stage's share of the cap too
                summary["budget"] = {**(summary.get("budget") or {}), "spent": report["budget"]}
                checkpoint.write_json(out_dir / "summary.json", summary)
    except TrainingInterrupted as e:
        status, message = EXIT_SIGTERM, f"{e}\n"
    except (TrainingError, *checkpoint.LOAD_ERRORS) as e:
        status, message = 2, f"error: {e}\n"
    else:
        status = None
    distributed.wait_for_all()  # every process ends here, after process 0's stages after training
    if status is not None:
        parser.exit(status, message)


if __name__ == "__main__":
    main()
