"""Calibration from the train shards in the order of the 1.0611 record's ShuffledSequenceLoader
(its own class run here), and the source switch."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from golf_jax import calibration, data
from golf_jax.config import Config, ConfigError, QuantConfig
from tests.conftest import reference_source

FRONTIER = "frontier_1855/train_gpt.py"


def write_shards(tmp_path, lengths) -> str:
    rng = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        data.write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1000, n))
    return str(tmp_path / "fineweb_train_*.bin")


def reference_loader(pattern: str, seq_len: int, world_size: int, rank: int):
    import torch

    src = reference_source(FRONTIER, "_SHARD_HEADER_BYTES", "_SHARD_NTOKENS_CACHE", "_MMAP_CACHE",
                           "_read_num_tokens", "_get_shard_memmap", "ShuffledSequenceLoader")
    namespace = {"np": np, "torch": torch, "glob": __import__("glob"), "Path": __import__("pathlib").Path}
    exec(src, namespace)
    h = types.SimpleNamespace(world_size=world_size, rank=rank, train_seq_len=seq_len, train_files=pattern)
    return namespace["ShuffledSequenceLoader"](h, "cpu")


@pytest.mark.parametrize("world_size, rank", [(2, 0), (1, 0), (3, 1)])
def test_train_windows_follow_the_reference_loader(tmp_path, world_size, rank):
    """Several batches, past the point where every window was used and the shards are cut
    again; shards of a few windows, one shorter than two."""
    pattern = write_shards(tmp_path, [200, 90, 161, 40, 130])
    seq_len, batch, batches = 16, 6, 7
    loader = reference_loader(pattern, seq_len, world_size, rank)
    # next_batch(global_tokens, grad_accum_steps): each rank's batch is global / (world x accum) tokens
    want = [loader.next_batch(batch * seq_len * world_size, 1) for _ in range(batches)]
    ours = calibration.train_shard_windows(pattern, seq_len, batch * batches, world_size, 1000, rank)
    assert ours.shape == (batch * batches, seq_len + 1)
    np.testing.assert_array_equal(ours[:, :-1], np.concatenate([x.numpy() for x, _ in want]))
    np.testing.assert_array_equal(ours[:, 1:], np.concatenate([y.numpy() for _, y in want]))


def test_train_windows_refuse_what_they_cannot_read(tmp_path):
    pattern = write_shards(tmp_path, [200, 10])
    with pytest.raises(data.DataError, match="shorter than one calibration window of 17 tokens"):
        calibration.train_shard_windows(pattern, 16, 4, 1, 1000)
    with pytest.raises(data.DataError, match="rank 5 of 8 reads no shard"):
        calibration.train_shard_windows(pattern, 16, 4, 8, 1000, rank=5)
    with pytest.raises(data.DataError, match="token id .* >= vocab_size 500"):
        calibration.train_shard_windows(str(tmp_path / "fineweb_train_000000.bin"), 16, 4, 1, 500)


def test_calibration_source_is_checked():
    cfg = Config()
    with pytest.raises(ConfigError, match="quant.calib_source"):
        dataclasses.replace(cfg, quant=QuantConfig(calib_source="val")).validate()
    with pytest.raises(ConfigError, match="quant.scheme"):
        dataclasses.replace(cfg, quant=QuantConfig(scheme="gptq")).validate()
