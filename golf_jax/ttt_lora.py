"""The 1.0611 record's phased score-first LoRA TTT (SPEC.md section 5; the
reference's eval_val_ttt_phased), with ttt.mode = "lora_phased". Its schedule
(documents, batches, chunk windows, phases, ranks) is golf_jax/ttt_schedule.py's.

- Each row (document) of a batch has its own LoRA (`model.LoRA`) on every layer
  application of the looped model and on the head. A full batch reuses the rank's last
  full batch's A factors ("warm") with B zeroed and a fresh optimizer; a partial batch
  gets new random A. AdamW, decoupled decay on every factor.
- Score first: each chunk is scored by the LoRA as trained on the document's earlier
  chunks only; then, unless it is the document's last chunk, one AdamW step on the
  chunk's mean loss, from the same forward (`chunk_step_for`).
- Phases: all weights take SGD steps (`_global_phase`) on the phase's documents,
  then every rank's LoRA is rebuilt with new random A.
- Ranks: each keeps its own LoRA chain (its warm A, its own constructions); they run
  here one after another between the phases: 8 ranks give the record's 8-GPU schedule.

Programs: one chunk step per window width (and one of ttt.lora_compact_rows rows,
`ttt_schedule.compact_from`) and one global SGD step per kind of batch (its length, its
segment slots), all compiled before the first batch (`compile_ahead`), with the small
programs around them (`precompile`, beside the artifact's reload).

Devices (run.num_devices, this process's): a batch's rows are split over them, each
device holding its rows' inputs, LoRA factors and optimizer state; the weights are
replicated. Rows are independent (each its own adapter and loss), so a chunk step has no
collective at all, and the scores are the one-device scores. A global phase's batches are
split over the devices as the reference's ranks split them (ttt.global_data_parallel), so
from the first phase on the scores are the reference's on that many GPUs; off, every
device takes the whole batch (one device's result).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from golf_jax import data, model, runlog, ttt_schedule
from golf_jax.config import Config, ModelConfig, TTTConfig
from golf_jax.param_tree import Params
from golf_jax.train_step import AXIS, make_mesh

# init_a(construction, rows) -> A factors of the construction-th LoRA (every target, `rows` rows).
InitA = Callable[[int, int], dict]


@dataclass(frozen=True)
class LoRATTTResult:
    loss: float  # mean cross-entropy of every scored target, nats
    bpb: float
    tokens: int
    bytes: int
    seconds: float
    documents: int
    phases: int  # global SGD phases run
    phase_seconds: float  # of `seconds`: the global phases (their program's compilation not included)
    compile_ahead_seconds: float  # of `seconds`: `compile_ahead`'s wall time (0: run with ahead=False)
    compile_seconds: float  # every compilation's time summed (runlog.CompileCounter; overlapping ones each)
    compilations: int
    steps: int  # chunk steps
    positions: int  # token positions the chunk steps ran, padding included (rows x window width, summed)
    chunk_row_sums: list[np.ndarray]  # per chunk step (in order): each row's scored loss sum, float64
    chunk_tokens: list[int]
    chunk_bytes: list[int]


def summary(result: LoRATTTResult) -> dict:
    """The report, without the per-chunk lists."""
    return {k: v for k, v in dataclasses.asdict(result).items() if not k.startswith("chunk_")}


# ----------------------------------------------------------------------------- the LoRA

def lora_shapes(cfg: ModelConfig, rows: int, rank: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(A shape, B shape) of each target (model.LoRA)."""
    slots = cfg.layer_applications(cfg.looping_after_training)
    d = cfg.model_dim
    out = {"q": d, "k": cfg.kv_dim, "v": cfg.kv_dim, "o": d, "mlp": d}
    shapes = {t: ((slots, rows, rank, d), (slots, rows, o, rank)) for t, o in out.items()}
    shapes["head"] = ((rows, rank, d), (rows, cfg.vocab_size, rank))
    return shapes


def random_init_a(cfg: ModelConfig, rank: int, seed: int) -> InitA:
    """A uniform in +-1/sqrt(in) (the reference's init), a new key per construction."""
    def init(construction: int, rows: int) -> dict:
        key = jax.random.fold_in(jax.random.key(seed), construction)
        shapes = lora_shapes(cfg, rows, rank)
        keys = jax.random.split(key, len(shapes))
        bound = 1.0 / math.sqrt(cfg.model_dim)
        return {t: jax.random.uniform(k, a, jnp.float32, -bound, bound) for k, (t, (a, _)) in zip(keys, shapes.items())}
    return init


def fresh_lora(a_factors: dict, cfg: ModelConfig, t: TTTConfig) -> model.LoRA:
    """A LoRA of lora_batch_docs rows: A from a_factors (rows past theirs zero), B zero."""
    shapes = lora_shapes(cfg, t.lora_batch_docs, t.lora_rank)
    factors = {}
    for name, (a_shape, b_shape) in shapes.items():
        a = jnp.asarray(a_factors[name], jnp.float32)
        pad = [(0, 0)] * (a.ndim - 3) + [(0, a_shape[-3] - a.shape[-3]), (0, 0), (0, 0)]  # rows: third from last
        factors[name] = (jnp.pad(a, pad), jnp.zeros(b_shape, jnp.float32))
    return model.LoRA(factors, t.lora_alpha / t.lora_rank)


@functools.lru_cache(maxsize=None)
def _copy_program(sharding: NamedSharding | None) -> Callable:
    def copy_tree(tree):
        return jax.tree.map(jnp.copy, tree)
    return jax.jit(copy_tree) if sharding is None else jax.jit(copy_tree, out_shardings=sharding)


class RowPlacement:
    """Where a batch's arrays live: on several devices, rows split over the mesh
    (inputs along their leading axis, LoRA factors and their moments along
    their row axis, which is third from last), weights and scalars replicated;
    on one device, nothing placed. Every array a program takes is placed so,
    before its first call too: a placement that changed after one call would
    compile the program again."""

    def __init__(self, mesh: jax.sharding.Mesh, rows: int, compact_rows: int = 0):
        self.mesh = mesh if mesh.size > 1 else None
        self.size = mesh.size
        for name, n in (("lora_batch_docs", rows), ("lora_compact_rows", compact_rows)):
            if self.mesh is not None and n % mesh.size:
                raise ValueError(f"ttt.{name}={n} rows cannot be split over {mesh.size} devices "
                                 "(run.num_devices): use a multiple")

    def _put(self, x, spec: P):
        return x if self.mesh is None else jax.device_put(x, NamedSharding(self.mesh, spec))

    def replicated(self, tree):
        return jax.tree.map(lambda x: self._put(x, P()), tree)

    def replicated_copy(self, tree):
        """A replicated copy of tree in buffers of its own (the global phases donate theirs),
        as one program: a copy per array compiled one program per shape."""
        return _copy_program(None if self.mesh is None else NamedSharding(self.mesh, P()))(tree)

    def rows(self, tree):
        return jax.tree.map(lambda x: self._put(x, P(AXIS)), tree)

    def global_batch(self, stream: np.ndarray, lo: int, n_seqs: int, cfg: Config):
        """A global phase's batch (`global_batch_rows`), split over the devices with
        ttt.global_data_parallel, else whole (and unplaced: every device takes it)."""
        split = self.global_mesh(cfg) is not None
        rows = self.size if split else 1
        batch = ttt_schedule.global_batch_rows(stream, lo, n_seqs, cfg.eval.eval_seq_len, rows, cfg)
        return self.rows(batch) if split else batch

    def global_mesh(self, cfg: Config) -> jax.sharding.Mesh | None:
        """The mesh the global SGD step splits its batch over (None: whole)."""
        return self.mesh if cfg.ttt.global_data_parallel else None

    def factors(self, tree):
        """A LoRA, or its optimizer state: factors by rows, the step count replicated."""
        return jax.tree.map(lambda x: self._put(x, P(*([None] * (x.ndim - 3)), AXIS) if x.ndim >= 3 else P()), tree)


def lora_optimizer(t: TTTConfig) -> optax.GradientTransformation:
    """torch's AdamW: decoupled decay on every factor (A and B)."""
    return optax.adamw(t.lora_lr, b1=t.lora_beta1, b2=t.lora_beta2, eps=t.lora_eps, weight_decay=t.lora_weight_decay)


def _step_settings(t: TTTConfig) -> TTTConfig:
    """The fields of t a chunk step's programs read (the chunk length, the optimizer's), the
    others at their defaults: runs that differ only in their phases, ranks, compaction or
    batch size share one jitted step, and so its compiled programs."""
    return TTTConfig(mode=t.mode, lora_chunk_tokens=t.lora_chunk_tokens, lora_lr=t.lora_lr, lora_beta1=t.lora_beta1,
                     lora_beta2=t.lora_beta2, lora_eps=t.lora_eps, lora_weight_decay=t.lora_weight_decay)


# ----------------------------------------------------------------------------- the programs

def chunk_step_for(cfg: ModelConfig, t: TTTConfig) -> Callable:
    """The jitted chunk step (one program per window width and row count), one per model
    configuration and step settings (`_step_settings`)."""
    return _chunk_step(cfg, _step_settings(t))


@functools.lru_cache(maxsize=8)
def _chunk_step(cfg: ModelConfig, t: TTTConfig) -> Callable:
    tx = lora_optimizer(t)
    looping = cfg.looping_after_training

    def lora_chunk_step(params, lora, opt_state, x_BxW, y_BxW, score_lo_B, score_hi_B, train_lo, train_rows_B, do_step):
        # Every row's scored targets lie in the chunk [train_lo, train_lo + C) (`ttt_schedule.chunk_inputs`):
        # the head and the loss run on those C positions only.
        C = t.lora_chunk_tokens
        pos_C = train_lo + jnp.arange(C)

        def loss_fn(lora):
            nll = model.lora_token_nll(params, cfg, x_BxW, y_BxW, lora, looping=looping, first=train_lo, count=C)
            per_doc = jnp.sum(nll, axis=1) / C
            return jnp.sum(per_doc * train_rows_B), nll

        (_, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora)
        scored = (pos_C[None, :] >= score_lo_B[:, None]) & (pos_C[None, :] < score_hi_B[:, None])
        row_sums = jnp.sum(jnp.where(scored, nll, 0.0), axis=1)
        updates, stepped_state = tx.update(grads, opt_state, lora)
        stepped = optax.apply_updates(lora, updates)
        # reference quirk: no step (and so no weight decay) when no document of the batch trains
        keep = lambda new, old: jnp.where(do_step, new, old)  # noqa: E731
        return jax.tree.map(keep, stepped, lora), jax.tree.map(keep, stepped_state, opt_state), row_sums

    return jax.jit(lora_chunk_step, donate_argnums=(1, 2))


@functools.lru_cache(maxsize=8)
def global_step_for(cfg: ModelConfig, t: TTTConfig, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """One SGD step of every weight on one batch given as D packed rows (`global_batch_rows`;
    on a mesh of D devices, one a device) with token weights (0 on padding): the gradient
    of the mean over the rows of each row's mean loss, as the reference's D ranks average
    theirs. torch's clip_grad_norm_ (coefficient clip / (norm + 1e-6), at most 1) and
    momentum (buf = m buf + g, p -= lr buf)."""
    looping = cfg.looping_after_training

    def rows_grads(params, x_RxT, y_RxT, segments, w_RxT, n_rows):  # n_rows: the rows holding tokens
        def loss(p):
            nll = model.token_nll(p, cfg, x_RxT, y_RxT, looping=looping, segments=segments)
            row_means = jnp.sum(nll * w_RxT, axis=1) / jnp.maximum(jnp.sum(w_RxT, axis=1), 1.0)
            return jnp.sum(row_means) / n_rows
        return jax.grad(loss)(params)

    def global_sgd_step(params, momentum, x_DxT, y_DxT, segments, w_DxT, lr):
        n_rows = jnp.sum(jnp.any(w_DxT > 0, axis=1))
        if mesh is None:
            grads = rows_grads(params, x_DxT, y_DxT, segments, w_DxT, n_rows)
        else:  # each device its row (the reference's ranks), the gradients summed
            def device_grads(params, x, y, segments, w, n_rows):
                return jax.lax.psum(rows_grads(params, x, y, segments, w, n_rows), AXIS)
            # as training's step (train_step.py): the psum is explicit, so JAX's replication
            # typing is off (with it on, the replicated weights' gradient would come out summed
            # already, and the psum would count it n times)
            grads = jax.shard_map(device_grads, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P()),
                                  out_specs=P(), check_vma=False)(params, x_DxT, y_DxT, segments, w_DxT, n_rows)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        if t.global_grad_clip > 0:
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
            coef = jnp.minimum(t.global_grad_clip / (norm + 1e-6), 1.0)
            grads = jax.tree.map(lambda g: g * coef, grads)
        momentum = jax.tree.map(lambda b, g: t.global_momentum * b + g, momentum, grads)
        params = jax.tree.map(lambda p, b: (p.astype(jnp.float32) - lr * b).astype(p.dtype), params, momentum)
        return params, momentum

    return jax.jit(global_sgd_step, donate_argnums=(0, 1))


def _row_axis(x: jax.Array) -> int | None:
    """A LoRA factor's (or its moment's) row axis, third from last; None for the step count."""
    return x.ndim - 3 if x.ndim >= 3 else None


@functools.partial(jax.jit, static_argnums=2)
def _rows_window(tree, first_row, rows: int):
    """Rows [first_row, first_row + rows) of a LoRA or its optimizer state (the step count whole)."""
    return jax.tree.map(lambda x: x if _row_axis(x) is None else
                        jax.lax.dynamic_slice_in_dim(x, first_row, rows, axis=_row_axis(x)), tree)


@functools.lru_cache(maxsize=8)
def _rejoin_for(t: TTTConfig) -> Callable:
    """The whole batch's LoRA after a compacted batch (`ttt_schedule.compact_from`): the rows
    left out take the AdamW steps they sat out, each with a zero gradient (what a chunk step
    gives a row that no longer trains: the same update, so the same warm A), and the
    window's rows come back from their own steps."""
    tx = lora_optimizer(t)

    def rejoin(whole_lora, whole_state, window_lora, first_row, idle_steps):
        def idle(_, carry):
            lora, state = carry
            updates, state = tx.update(jax.tree.map(jnp.zeros_like, lora), state, lora)
            return optax.apply_updates(lora, updates), state

        lora, _ = jax.lax.fori_loop(0, idle_steps, idle, (whole_lora, whole_state))
        return jax.tree.map(lambda x, w: jax.lax.dynamic_update_slice_in_dim(x, w, first_row, axis=_row_axis(x)),
                            lora, window_lora)

    return jax.jit(rejoin, donate_argnums=0)


# ----------------------------------------------------------------------------- one batch, one phase

def _score_batch(params, lora, tokens, cum_bytes, docs, t: TTTConfig, step, log: dict, place: RowPlacement):
    """Every chunk of one batch: score, then step. Returns the trained LoRA."""
    starts, lengths = docs
    pred_lens = lengths - 1
    opt_state = place.factors(lora_optimizer(t).init(lora))
    compact = ttt_schedule.compact_from(pred_lens, t)  # (chunk, first row) or None
    outs, whole, first_row, idle_steps = [], None, 0, 0
    for ci in range(ttt_schedule.chunk_count(pred_lens, t)):
        inputs, scored, first = ttt_schedule.chunk_inputs(tokens, starts, pred_lens, ci, t)
        x, y, lo, hi, train_lo, train, do_step = inputs
        if compact is not None and ci == compact[0]:  # from here on, the rows still scoring alone
            whole, first_row = (lora, opt_state), compact[1]
            lora, opt_state = (place.factors(_rows_window(tree, first_row, t.lora_compact_rows))
                               for tree in (lora, opt_state))
        if whole is not None:
            x, y, lo, hi, train = (a[first_row:first_row + t.lora_compact_rows] for a in (x, y, lo, hi, train))
            idle_steps += bool(do_step)
        x, y, lo, hi, train = map(place.rows, (x, y, lo, hi, train))
        lora, opt_state, row_sums = step(params, lora, opt_state, x, y, lo, hi, train_lo, train, do_step)
        outs.append((row_sums, first_row if whole is not None else 0))
        log["positions"] += x.size
        log["chunk_tokens"].append(int(scored.sum()))
        log["chunk_bytes"].append(int(np.sum(cum_bytes[first + scored] - cum_bytes[first])))
    for row_sums, at in outs:  # the rows outside a compacted step's window scored nothing
        sums = np.zeros(t.lora_batch_docs)
        sums[at:at + row_sums.shape[0]] = np.asarray(row_sums, np.float64)
        log["chunk_row_sums"].append(sums)
    if whole is not None:
        lora = place.factors(_rejoin_for(_step_settings(t))(*whole, lora, first_row, idle_steps))
    return lora


def _global_phase(params, cfg: Config, stream: np.ndarray, place: RowPlacement) -> Params:
    """SGD of every weight over the scored documents (`ttt_schedule.phase_stream`, `phase_steps`),
    attention within documents (split at the sequence length), as training's."""
    step = global_step_for(cfg.model, cfg.ttt, place.global_mesh(cfg))
    momentum = place.replicated(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    for lo, n_seqs, lr in ttt_schedule.phase_steps(len(stream) - 1, cfg.ttt, cfg.eval.eval_seq_len):
        params, momentum = step(params, momentum, *place.global_batch(stream, lo, n_seqs, cfg), jnp.float32(lr))
    return params


def _phase_batch_kinds(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, phases: list, cfg: Config,
                       place: RowPlacement) -> list:
    """One batch of each shape the global phases' steps take (rows of many short documents
    need more segment slots: `global_batch_rows`), for `compile_ahead`."""
    kinds = {}
    for docs in phases:
        stream = ttt_schedule.phase_stream(tokens, starts, lengths, docs)
        for lo, n_seqs, _ in ttt_schedule.phase_steps(len(stream) - 1, cfg.ttt, cfg.eval.eval_seq_len):
            batch = place.global_batch(stream, lo, n_seqs, cfg)
            kinds.setdefault(tuple(np.shape(a) for a in jax.tree.leaves(batch)), batch)
    return list(kinds.values())


def compile_ahead(params, cfg: Config, lora: model.LoRA, programs: list[tuple[int, int]], place: RowPlacement,
                  phase_batches: list) -> None:
    """Compiles the chunk step of every (rows, window width) in `programs`
    (`ttt_schedule.chunk_programs`), a compacted batch's window and rejoining, and the global
    SGD step of each of phase_batches (`_phase_batch_kinds`), each in a thread of its own once
    lowered (lowering, in Python, goes one at a time: lowered all first, every compilation
    waited for the last); the run's calls (same argument types and placement) find them."""
    t, mcfg, step = cfg.ttt, cfg.model, chunk_step_for(cfg.model, cfg.ttt)

    def lowered():
        for rows, width in programs:  # the argument types of `_score_batch`'s calls
            adapters = lora if rows == t.lora_batch_docs else place.factors(_rows_window(lora, 0, rows))
            opt_state = place.factors(lora_optimizer(t).init(adapters))
            x = place.rows(np.zeros((rows, width), np.int32))
            ends, train = place.rows(np.zeros(rows, np.int32)), place.rows(np.zeros(rows, np.float32))
            yield step.lower(params, adapters, opt_state, x, x, ends, ends, np.int32(0), train, np.bool_(True))
            if rows < t.lora_batch_docs:  # a compacted batch's window of the optimizer state, and its rejoining
                whole_state = place.factors(lora_optimizer(t).init(lora))
                _rows_window(whole_state, 0, rows)
                yield _rejoin_for(_step_settings(t)).lower(lora, whole_state, adapters, 0, 0)
        momentum = (place.replicated(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
                    if phase_batches else None)
        for batch in phase_batches:
            yield global_step_for(mcfg, t, place.global_mesh(cfg)).lower(params, momentum, *batch, jnp.float32(0))

    with runlog.thread_pool(2 * len(programs) + len(phase_batches) + 1) as pool:
        for future in [pool.submit(program.compile) for program in lowered()]:
            future.result()


def precompile(params_like: Params, cfg: Config, tokens: np.ndarray) -> float:
    """Compiles every program `run` calls on these tokens for weights of params_like's shapes
    and dtypes (zeros stand in), placed as `run` places them; the quantize pipeline calls it
    beside the artifact's reload, the evaluation's first stage. Returns its seconds."""
    t0, t = time.perf_counter(), cfg.ttt
    place = RowPlacement(make_mesh(cfg.run.num_devices, local=True), t.lora_batch_docs, t.lora_compact_rows)
    # the small programs too (the weights' copy, a partial batch's A): each on the run's critical path
    shaped = place.replicated_copy(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params_like))
    tokens = np.asarray(tokens, np.int32)
    starts, lengths = ttt_schedule.find_documents(tokens, cfg.model.bos_id)
    phases = ttt_schedule.rank_schedule(lengths, t, t.lora_ranks).phases
    init_a = random_init_a(cfg.model, t.lora_rank, 0)
    for rows in {len(docs) for _, docs in ttt_schedule.batch_order(lengths, t.lora_batch_docs)} - {t.lora_batch_docs}:
        fresh_lora(init_a(0, rows), cfg.model, t)
    lora = place.factors(fresh_lora(init_a(0, t.lora_batch_docs), cfg.model, t))
    compile_ahead(shaped, cfg, lora, ttt_schedule.chunk_programs(lengths, t), place,
                  _phase_batch_kinds(tokens, starts, lengths, phases, cfg, place))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the evaluation

def run(params: Params, cfg: Config, tokens: np.ndarray, tables: data.TargetBytes, init_a: InitA | None = None,
        progress: bool = True, ahead: bool = True) -> LoRATTTResult:
    """The phased score-first LoRA TTT over `tokens` (the validation stream);
    `params` are not modified. init_a: the A factors of each LoRA built, in
    order (default: `random_init_a` with run.seed). ahead: every program
    compiled before the first batch (`compile_ahead`; False: compiled already by
    `precompile`, or as they come)."""
    t0 = time.perf_counter()
    t, mcfg = cfg.ttt, cfg.model
    tokens = np.asarray(tokens, np.int32)
    init_a = init_a or random_init_a(mcfg, t.lora_rank, cfg.run.seed)
    starts, lengths = ttt_schedule.find_documents(tokens, mcfg.bos_id)
    cum_bytes = np.concatenate([[0], np.cumsum(tables.target_bytes(tokens))])
    schedule = ttt_schedule.rank_schedule(lengths, t, t.lora_ranks)
    with runlog.CompileCounter() as compiles:  # every compilation of the run, its placement's too
        place = RowPlacement(make_mesh(cfg.run.num_devices, local=True), t.lora_batch_docs, t.lora_compact_rows)
        params = place.replicated_copy(params)
        step = chunk_step_for(mcfg, t)
        constructions = [0] * t.lora_ranks  # each rank builds its own LoRAs (the reference's ranks seed alike)

        def build(rank: int, rows: int) -> model.LoRA:
            constructions[rank] += 1
            return place.factors(fresh_lora(init_a(constructions[rank] - 1, rows), mcfg, t))

        warm = [build(rank, t.lora_batch_docs) for rank in range(t.lora_ranks)]
        ahead_t0 = time.perf_counter()
        if ahead:  # the run's own placed weights and LoRA (`precompile` makes stand-ins of them)
            compile_ahead(params, cfg, warm[0], ttt_schedule.chunk_programs(lengths, t), place,
                          _phase_batch_kinds(tokens, starts, lengths, schedule.phases, cfg, place))
        ahead_s = time.perf_counter() - ahead_t0 if ahead else 0.0
        log = {"chunk_row_sums": [], "chunk_tokens": [], "chunk_bytes": [], "positions": 0}
        phase_s, bar = 0.0, tqdm(total=len(starts), desc="ttt lora", unit="doc", disable=not progress)
        for era, rank_batches in enumerate(schedule.eras):
            for rank, batches in enumerate(rank_batches):  # the ranks one after another
                for _, docs in batches:
                    full = len(docs) == t.lora_batch_docs
                    if full:  # the rank's warm A, B zeroed
                        zeroed = {k: (a, jnp.zeros_like(b)) for k, (a, b) in warm[rank].factors.items()}
                        lora = place.factors(warm[rank].replace(factors=zeroed))
                    else:  # reference quirk: a partial batch gets a LoRA of its own, the warm one waits
                        lora = build(rank, len(docs))
                    lora = _score_batch(params, lora, tokens, cum_bytes, (starts[docs], lengths[docs]), t, step, log,
                                        place)
                    if full:
                        warm[rank] = lora
                    bar.update(len(docs))
            if era < len(schedule.phases):
                phase_t0, compile_t0 = time.perf_counter(), compiles.seconds
                params = jax.block_until_ready(_global_phase(
                    params, cfg, ttt_schedule.phase_stream(tokens, starts, lengths, schedule.phases[era]), place))
                phase_s += time.perf_counter() - phase_t0 - (compiles.seconds - compile_t0)
                warm = [build(rank, t.lora_batch_docs) for rank in range(t.lora_ranks)]
        bar.close()
        phase = len(schedule.phases)
    n_tokens, n_bytes = sum(log["chunk_tokens"]), sum(log["chunk_bytes"])
    loss_sum = float(sum(np.sum(r) for r in log["chunk_row_sums"]))
    mean_loss, bpb = data.bits_per_byte(loss_sum, n_tokens, n_bytes)
    return LoRATTTResult(mean_loss, bpb, n_tokens, n_bytes, time.perf_counter() - t0, len(starts), phase, phase_s,
                         ahead_s, compiles.seconds, compiles.count, len(log["chunk_tokens"]), log["positions"],
                         log["chunk_row_sums"], log["chunk_tokens"], log["chunk_bytes"])
