"""Files written whole or not at all: every writer of golf_jax goes through here.

The bytes go to a temporary name in the destination's folder, are flushed and
fsynced, get a normal file's mode, and are renamed over the destination; then
the folder is fsynced, so that the rename itself survives a crash. A crash
leaves the old file or the new one under the name, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes(path: str | Path, data: bytes) -> int:
    """Write `data` to `path` atomically; returns the number of bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return len(data)


def write_text(path: str | Path, text: str) -> int:
    return write_bytes(path, text.encode("utf-8"))


def fsync_dir(directory: str | Path) -> None:
    """Make renames in `directory` durable. Best effort: some platforms and
    file systems cannot open a folder."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
