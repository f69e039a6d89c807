"""The GPTQ calibration tokens (quant.calib_source): sequences the model samples itself
(the 1.1147 record's: golf_jax.generate.calibration_tokens), or windows of the train
shards in the order the 1.0611 record's rank 0 reads them (its ShuffledSequenceLoader,
L701, which serialize() builds afresh for collect_hessians)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from golf_jax import data, datasets, generate
from golf_jax.config import Config
from golf_jax.param_tree import Params


class _ShuffledWindows:
    """The reference's loader of one rank: every world_size-th shard from `rank`'s; each
    shard cut at a random phase into seq_len windows in a random order; each window from a
    shard drawn in proportion to the windows it has left; all shards cut afresh once
    every window is used. One numpy PCG64(rank) stream for all of it."""

    def __init__(self, files: list[Path], seq_len: int, rank: int):
        self.files, self.seq_len = files, seq_len
        self.rng = np.random.Generator(np.random.PCG64(rank))
        self.tokens = [data.read_shard(f) for f in files]
        self.starts = [self._cut(len(t)) for t in self.tokens]

    def _cut(self, n: int) -> list[int]:
        max_phase = min(self.seq_len - 1, max(0, n - self.seq_len - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        order = self.rng.permutation((n - 1 - phase) // self.seq_len)
        return (phase + order * self.seq_len).tolist()

    def windows(self, count: int) -> np.ndarray:
        """[count, seq_len + 1] tokens: each window's inputs and its next token."""
        out = np.empty((count, self.seq_len + 1), np.int32)
        remaining = np.array([len(s) for s in self.starts], np.float64)
        for i in range(count):
            if remaining.sum() <= 0:
                self.starts = [self._cut(len(t)) for t in self.tokens]
                remaining = np.array([len(s) for s in self.starts], np.float64)
            shard = int(self.rng.choice(len(self.files), p=remaining / remaining.sum()))
            start = self.starts[shard].pop()
            remaining[shard] -= 1
            out[i] = self.tokens[shard][start:start + self.seq_len + 1]
        return out


def train_shard_windows(pattern: str, seq_len: int, count: int, world_size: int, vocab_size: int,
                        rank: int = 0) -> np.ndarray:
    """`count` windows of seq_len + 1 train tokens as rank `rank` of `world_size` reads
    them (the record: rank 0 of 8, 16 batches of 48 windows of 2048 tokens)."""
    files = data.shard_files(pattern)[rank::world_size]
    if not files:
        raise data.DataError(f"{pattern}: rank {rank} of {world_size} reads no shard (quant.calib_loader_world_size)")
    for path in files:
        if len(data.read_shard(path)) < seq_len + 1:
            raise data.DataError(f"{path}: shorter than one calibration window of {seq_len + 1} tokens")
    windows = _ShuffledWindows(files, seq_len, rank).windows(count)
    bad = np.argwhere(windows >= vocab_size)
    if bad.size:
        i, j = bad[0]
        raise data.DataError(f"{pattern}: calibration window {i} holds token id {windows[i, j]} >= vocab_size "
                             f"{vocab_size}")
    return windows


def calibration_tokens(params: Params, cfg: Config, progress: bool = False) -> np.ndarray:
    """[calib_num_seqs, calib_seq_len (+ 1 from the shards)] tokens; the Hessians read tokens[:, :-1]."""
    q, d = cfg.quant, cfg.data
    if q.calib_source == "self_generated":
        return generate.calibration_tokens(params, cfg, progress=progress)
    ds = datasets.resolve_dataset(d.data_dir, d.tokenizer_path, d.train_pattern, d.val_pattern, cfg.model.vocab_size,
                                  d.text_transform)
    return train_shard_windows(ds.train_pattern, q.calib_seq_len, q.calib_num_seqs, q.calib_loader_world_size,
                               cfg.model.vocab_size)
