"""Files written whole or not at all, by every writer (golf_jax.atomic)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from golf_jax import atomic, checkpoint, data


def test_write_is_whole_with_a_normal_mode_and_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "sub" / "x.bin"
    assert atomic.write_bytes(path, b"abc") == 3 and path.read_bytes() == b"abc"
    assert len(synced) == 2  # the file, then its folder (the rename)
    assert path.stat().st_mode & 0o777 == 0o666 & ~atomic.current_umask()
    assert os.listdir(path.parent) == ["x.bin"]


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "x.txt"
    atomic.write_text(path, "old")

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(atomic.os, fail_in, crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic.write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]


def test_shards_and_json_reports_go_through_it(tmp_path, monkeypatch):
    written = []
    real = atomic.write_bytes
    monkeypatch.setattr(atomic, "write_bytes", lambda path, buf: written.append(path.name) or real(path, buf))
    data.write_shard(tmp_path / "s.bin", np.arange(10))
    checkpoint.write_json(tmp_path / "r.json", {"a": np.float32(1.5)})
    assert written == ["s.bin", "r.json"]
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1.5}
    np.testing.assert_array_equal(data.read_shard(tmp_path / "s.bin"), np.arange(10))
