"""The group compressors: each round-trips, and a missing binary or package
is an error that says how to install it."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from golf_jax import compressors
from golf_jax.artifact import ArtifactError

# Repeats: lrzip stores data its quick LZO test finds incompressible (random int6 values are).
DATA = np.tile(np.random.default_rng(0).integers(-31, 32, 1000), 20).astype(np.int8).tobytes()


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", list(compressors.COMPRESSORS))
def test_round_trip(name):
    if name == "lrzip" and shutil.which("lrzip") is None:
        pytest.skip("the lrzip binary is not installed (.ci/run installs it)")
    if name == "zpaq" and not _importable("zpaq"):
        pytest.skip("the optional zpaq package is not installed (golf_jax[zpaq])")
    compress, decompress = compressors.get(name)
    packed = compress(DATA)
    assert len(packed) < len(DATA) / 5
    assert decompress(packed) == DATA
    if name != "lrzip":  # lrzip's bytes may depend on the machine's threads
        assert compress(DATA) == packed


def test_missing_lrzip_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(compressors.shutil, "which", lambda name: None)
    with pytest.raises(ArtifactError, match="lrzip binary.*apt-get install lrzip"):
        compressors.get("lrzip")[0](DATA)


@pytest.mark.parametrize("name,module", [("zpaq", "zpaq"), ("brotli", "brotli")])
def test_a_missing_package_says_how_to_install_it(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ArtifactError, match=f"pip install {module}"):
        compressors.get(name)[0](DATA)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ArtifactError, match="unknown group compressor 'zstd': one of lrzip, zpaq, brotli, lzma"):
        compressors.get("zstd")
