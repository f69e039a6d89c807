"""The group compressors of the per-group artifact (golf_jax.artifact_pergroup):
name -> (compress, decompress), each bytes -> bytes, raising ArtifactError
with the install command when its package or binary is missing.

Measured on the same tensors (tests/frontier_reference/pergroup_sizes.py):
lrzip and zpaq within 0.001% of each other, brotli about 0.9% and lzma
about 6.6% larger.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
import tempfile
from pathlib import Path

from golf_jax.artifact import ArtifactError


def _lrzip(args: list[str], data: bytes, suffix: str, out_suffix: str) -> bytes:
    """Run the lrzip binary on `data` through files, as the reference does."""
    binary = shutil.which("lrzip")
    if binary is None:
        raise ArtifactError("the 'lrzip' group compressor needs the lrzip binary on PATH "
                            "(Debian/Ubuntu: apt-get install lrzip), or set quant.group_compressor "
                            "to 'zpaq' (as small, pip install zpaq), 'brotli' or 'lzma'")
    with tempfile.TemporaryDirectory(prefix="golf_jax_lrzip_") as tmp:
        src, dst = Path(tmp) / f"group{suffix}", Path(tmp) / f"group{out_suffix}"
        src.write_bytes(data)
        run = subprocess.run([binary, *args, "-o", str(dst), str(src)], capture_output=True)
        if run.returncode != 0 or not dst.is_file():
            raise ArtifactError(f"lrzip {' '.join(args)} failed (exit {run.returncode}): "
                                f"{run.stderr.decode(errors='replace').strip()[-500:]}")
        return dst.read_bytes()


def _zpaq():
    try:
        import zpaq
    except ImportError as e:
        raise ArtifactError("the 'zpaq' group compressor needs the 'zpaq' package (pip install zpaq, "
                            "or golf_jax[zpaq])") from e
    return zpaq


def brotli_module():
    try:
        import brotli
    except ImportError as e:
        raise ArtifactError("the per-group artifact needs the 'brotli' package (pip install brotli)") from e
    return brotli


COMPRESSORS = {
    # The reference's: ZPAQ after lrzip's long-range (rzip) pass, level 9.
    "lrzip": (lambda b: _lrzip(["-z", "-L", "9"], b, ".bin", ".bin.lrz"),
              lambda b: _lrzip(["-d", "-f"], b, ".lrz", ".bin")),
    # libzpaq in memory (PyPI zpaq), its strongest level; one thread, so the bytes do not
    # depend on the machine. Within 0.001% of lrzip's bytes (pergroup_sizes.py), no binary.
    "zpaq": (lambda b: _zpaq().compress(b, level=5, threads=1), lambda b: _zpaq().decompress(b)),
    "brotli": (lambda b: brotli_module().compress(b, quality=11, lgwin=24), lambda b: brotli_module().decompress(b)),
    "lzma": (lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
             lambda b: lzma.decompress(b, format=lzma.FORMAT_XZ)),
}


def get(name: str) -> tuple:
    """(compress, decompress) of the group compressor `name`."""
    if name not in COMPRESSORS:
        raise ArtifactError(f"unknown group compressor {name!r}: one of {', '.join(COMPRESSORS)}")
    return COMPRESSORS[name]
