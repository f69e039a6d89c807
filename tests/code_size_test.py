"""The 1.0611 record's code-size count: the same bytes as the reference's
own function on one script, and a wrapper that really runs golf_jax."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from golf_jax import artifact, code_size
from golf_jax.code_size import CodeSizeError
from tests.conftest import reference_source

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("python_minifier", reason="python-minifier is in the test extra (pyproject.toml)")


def test_one_script_counts_as_the_reference_counts_it():
    """The reference's _compressed_code_size (it runs the pyminify command)
    against minify + wrap on one of golf_jax's files."""
    import shutil
    if shutil.which("pyminify") is None:
        pytest.skip("the pyminify command (python-minifier's) is not on PATH")
    import brotli
    ns = {"subprocess": subprocess, "base64": base64, "brotli": brotli}
    exec(reference_source("frontier_1855/train_gpt.py", "_compressed_code_size"), ns)
    source = (REPO / "golf_jax" / "atomic.py").read_text()
    raw, counted = ns["_compressed_code_size"](source)
    assert raw == len(source.encode())
    assert len(code_size.wrap(code_size.minify(source).encode())) == counted


def test_the_wrapper_runs_the_code_it_counts(tmp_path):
    """Exec'ing the wrapper serves golf_jax's modules from the carried table
    (a fresh process, outside the repository, with two small modules)."""
    files = [REPO / "golf_jax" / "__init__.py", REPO / "golf_jax" / "atomic.py"]
    program = code_size.wrapper(files).decode() + (
        "import golf_jax.atomic as a\n"
        "assert type(a.__spec__.loader).__name__ == 'L', a.__spec__\n"
        f"print(a.write_bytes({str(tmp_path / 'x.bin')!r}, b'abc'))\n")
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "3" and (tmp_path / "x.bin").read_bytes() == b"abc"


def test_counts():
    assert code_size.counted_code_bytes("raw") == artifact.code_bytes()
    table = code_size.module_table([REPO / "golf_jax" / "__init__.py", REPO / "golf_jax" / "atomic.py"])
    assert list(table) == ["golf_jax", "golf_jax.atomic"] and table["golf_jax"][0] and not table["golf_jax.atomic"][0]
    counted = code_size.counted_code_bytes("minified_brotli")
    assert 0 < counted < artifact.code_bytes() / 3
    with pytest.raises(CodeSizeError, match="unknown code size count 'gzip'"):
        code_size.counted_code_bytes("gzip")


def test_a_missing_minifier_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "python_minifier", None)
    with pytest.raises(CodeSizeError, match="needs python-minifier"):
        code_size.minify("x = 1\n")
