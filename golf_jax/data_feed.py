"""The data feed of training: each step's micro-batches assembled on a
background thread and placed on the devices (this process's rows of the
global batch), so loading is off the critical path."""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np

from golf_jax import data


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


