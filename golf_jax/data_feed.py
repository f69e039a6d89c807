"""The data feed of training: each step's micro-batches assembled on a
background thread and placed on the devices (this process's rows of the
global batch), so loading is off the critical path. Rows of train_seq_len
(`data.TrainBatches`, the 1.1147 record's) or packed documents (`PackedSteps`,
the 1.0611 record's)."""

from __future__ import annotations

import queue
import threading
from typing import NamedTuple, Sequence

import jax
import numpy as np

from golf_jax import data, packing
from golf_jax.config import Config


class StepBatch(NamedTuple):
    """One optimizer step's inputs, global arrays [accum, rows, length] sharded
    by rows; segments: packed rows' documents (packing.Segments, leaves
    [accum, rows, ...]) or None;
    cursor: the stream's state after it, for checkpoints."""

    xs: jax.Array
    ys: jax.Array
    segments: packing.Segments | None
    cursor: dict


class PackedSteps:
    """The 1.0611 record's packed rows for this process's devices.

    The record's 8-GPU run takes one global span of 8 rows per step (its
    DocumentPackingLoader, world size 8, no accumulation); here every step
    takes one span of micro_batches_per_step rows (`packing.PackedBatches` with
    that world size) whatever the device count, so the rows are the record's.
    With n devices and accum micro-steps, device d's micro-step a is row a n + d:
    each device trains one row [1, L] per micro-step, L = train_batch_tokens /
    micro_batches_per_step. `ranks`: this process's devices (mesh positions).
    """

    def __init__(self, pattern: str, cfg: Config, n_devices: int, accum: int, ranks: Sequence[int]):
        rows = n_devices * accum
        self.row_len = cfg.data.train_batch_tokens // rows
        self.loader = packing.PackedBatches(pattern, 0, rows, cfg.data.train_seq_len, bos_id=cfg.model.bos_id,
                                            vocab_size=cfg.model.vocab_size)
        self.n_devices, self.accum, self.ranks = n_devices, accum, tuple(sorted(ranks))
        self.fold_len, self.segments_per_fold = cfg.data.train_seq_len, cfg.data.segments_per_fold
        self.fast_slots = cfg.data.fast_segment_slots

    def next_step(self, capacity: bool = False) -> tuple[np.ndarray, np.ndarray, packing.Segments]:
        """Host arrays [accum, len(ranks), ...]: inputs, targets and their segments, in the
        fewest slots per fold of data.segments_per_fold_fast that every row of the step fits
        (decided on all the step's rows, so every process takes the same program), else
        data.segments_per_fold; with `capacity`, data.segments_per_fold."""
        wanted = [a * self.n_devices + d for a in range(self.accum) for d in self.ranks]
        every = range(self.n_devices * self.accum)
        rows = self.loader.next_rows(self.row_len, every if self.fast_slots else wanted)
        slots = self.segments_per_fold
        if self.fast_slots and not capacity:
            needed = max(packing.segments_per_fold_needed(cu, self.row_len, self.fold_len) for _, _, cu, _ in rows)
            slots = next((m for m in self.fast_slots if needed <= m), slots)
        if self.fast_slots:
            rows = [rows[i] for i in wanted]
        shape = (self.accum, len(self.ranks))
        xs = np.stack([x[0] for x, _, _, _ in rows]).reshape(*shape, -1)
        ys = np.stack([y[0] for _, y, _, _ in rows]).reshape(*shape, -1)
        segs = [packing.make_segments(cu, self.row_len, self.fold_len, slots) for _, _, cu, _ in rows]
        return xs, ys, packing.Segments(*(np.concatenate(a).reshape(*shape, *a[0].shape[1:]) for a in zip(*segs)))

    def state(self) -> dict:
        return self.loader.state()

    def restore(self, state: dict) -> None:
        self.loader.restore(state)


class Prefetcher:
    """Assembles the next optimizer step's micro-batches on a background
    thread and puts them on the devices, so data loading is off the critical
    path. Each item carries the stream cursor after it, for checkpoints."""

    def __init__(self, batches: data.TrainBatches | PackedSteps, accum: int, sharding, depth: int = 2):
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


def next_step_batch(batches: data.TrainBatches | PackedSteps, accum: int, sharding,
                    capacity: bool = False) -> StepBatch:
    """One optimizer step's micro-batches as global arrays [accum, rows, seq]
    sharded by rows over the mesh, built from this process's ranks only
    (`capacity`: packed rows in data.segments_per_fold slots, `PackedSteps.next_step`)."""
    if isinstance(batches, PackedSteps):
        xs, ys, segs = batches.next_step(capacity)
        put = lambda a: _global_packed(a, batches, sharding)  # noqa: E731
        return StepBatch(put(xs), put(ys), packing.Segments(*map(put, segs)), batches.state())
    micro = [batches.next_micro_batch() for _ in range(accum)]
    xs = np.stack([x for x, _ in micro])
    ys = np.stack([y for _, y in micro])
    return StepBatch(_global_rows(xs, batches, sharding), _global_rows(ys, batches, sharding), None, batches.state())


def with_slots(segments: packing.Segments, slots: int) -> packing.Segments:
    """The shapes (jax.ShapeDtypeStruct, same placement) of packed rows' segments with
    `slots` slots per fold: a program to compile ahead for another layout."""
    def resized(a, extra):
        return jax.ShapeDtypeStruct((*a.shape[:-1], slots + extra), a.dtype, sharding=a.sharding)
    return packing.Segments(jax.ShapeDtypeStruct(segments.ids_BxT.shape, segments.ids_BxT.dtype,
                                                 sharding=segments.ids_BxT.sharding),
                            resized(segments.offsets_BxRxM1, 1), resized(segments.lengths_BxRxM, 0))


def _global_packed(local: np.ndarray, batches: PackedSteps, sharding) -> jax.Array:
    """[accum, n_devices, ...] from this process's rows: one row per device."""
    shape = (local.shape[0], batches.n_devices, *local.shape[2:])

    def block(index):
        at = batches.ranks.index(index[1].start or 0)
        return local[:, at:at + 1]

    return jax.make_array_from_callback(shape, sharding, block)


def _global_rows(local: np.ndarray, batches: data.TrainBatches, sharding) -> jax.Array:
    rows = batches.local_tokens // batches.seq_len  # per rank
    first = {r: i * rows for i, r in enumerate(batches.ranks)}  # rank -> its first row in `local`
    shape = (local.shape[0], batches.world_size * rows, local.shape[2])

    def block(index):  # the rows of one of this process's devices
        start = index[1].start or 0
        at = first[start // rows]
        return local[:, at:at + (index[1].stop or shape[1]) - start]

    return jax.make_array_from_callback(shape, sharding, block)


