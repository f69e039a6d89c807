"""Shared test helpers: where the reference fixtures and embedded data live."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import compat, datasets, model
from golf_jax.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("GOLF_JAX_FIXTURES", REPO.parent / "shared" / "fixtures" / "reference"))
# The reference code itself (../shared/reference): some tests run its functions.
REFERENCE = Path(os.environ.get("GOLF_JAX_REFERENCE", REPO.parent / "shared" / "reference"))

# Parity is float32 against float32: on a GPU, float32 matmuls would
# otherwise run as TF32. A no-op on the CPU.
jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for the whole run, this process and the
# subprocesses it starts (train.py runs, multi-device scripts): tests that build
# the same tiny programs compile them once. Fresh per run, so nothing is shared
# across runs. A program read from it still records JAX's backend-compile event,
# so runlog.CompileCounter counts it as a compilation (tests/runlog_test.py).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # else a parent run's (a test's subprocess)
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="golf_jax_test_xla_")
_COMPILE_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# On a machine without an accelerator plugin (CI's), XLA's CPU backend compiles the
# suite's programs faster with its elemental emitters than with its fusion emitters:
# tests/ttt_lora_test.py alone 105.6 -> 86.8 s, the whole suite on the 2-core machine
# 627-703 -> 440-487 s (docs/performance.md, 2026-12-03); every test passes either
# way. Set before the backend starts (below); the pytest-xdist workers and the
# subprocesses the tests start inherit it (`cpu_devices_env` appends their device counts).
# Only where this jaxlib's XLA knows the flag: an unknown one aborts the process (JAX
# 0.11.2's does not know it; 0.10.2's does).
CPU_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _xla_knows(flag: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                           env=dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu"))
    return probe.returncode == 0


if (importlib.util.find_spec("jax_plugins") is None and "xla_cpu_use_fusion_emitters" not in
        os.environ.get("XLA_FLAGS", "") and _xla_knows(CPU_COMPILE_FLAG)):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + CPU_COMPILE_FLAG

# On the CPU the suite's programs are small and run for milliseconds: compiling them
# is most of its time. They compile without LLVM's expensive passes (JAX's
# jax_disable_most_optimizations; the XLA graph passes run as always), in this
# process and in the subprocesses it starts: measured, the suite takes ~20% less.
# Only the last bits of some float32 results move (LLVM's fusing of a*b+c), so a
# test whose subject is rounding bit for bit against torch is marked
# `full_optimization` and compiles with LLVM's passes, as users' programs do (below).
ON_CPU = jax.default_backend() == "cpu"
if ON_CPU:
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # JAX_DISABLE_MOST_OPTIMIZATIONS=0: all at full
    REDUCED_BY_DEFAULT = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1"
    jax.config.update("jax_disable_most_optimizations", REDUCED_BY_DEFAULT)


@pytest.fixture(autouse=True)
def _full_optimization(request):
    """Each test compiles as its marker asks; the flag (and the in-memory caches)
    change only where a marked test follows an unmarked one, or the reverse."""
    if ON_CPU:
        reduced = REDUCED_BY_DEFAULT and request.node.get_closest_marker("full_optimization") is None
        if jax.config.values["jax_disable_most_optimizations"] != reduced:
            jax.config.update("jax_disable_most_optimizations", reduced)
            # The flag is not part of jit's in-memory cache key: drop the programs compiled
            # under the other setting (the persistent cache keys on it; nothing stale is read).
            jax.clear_caches()
    yield


# Under CI (CI=true, as .ci/run sets it) a missing fixture or embedded dataset
# fails the test: a suite must not pass by skipping its parity checks.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    (pytest.fail if IN_CI else pytest.skip)(what)


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        missing(f"reference fixture {path} not present (set GOLF_JAX_FIXTURES)")
    return path


def cpu_devices_env(devices: int) -> dict[str, str]:
    """This process's environment for a subprocess on `devices` host CPU devices: the
    device count appended to XLA_FLAGS, so the suite's own flags (CPU_COMPILE_FLAG) carry over."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


def run_on_cpu_devices(script: str, *args: str, devices: int = 2, timeout: int = 300) -> dict:
    """Run `script` in a fresh process on `devices` host CPU devices (`cpu_devices_env`), with
    the repo's path as argv[1] and then `args`; the JSON its last line of output prints."""
    run = subprocess.run([sys.executable, "-c", script, str(REPO), *args], env=cpu_devices_env(devices), cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


TINY_MODEL = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, bigram_vocab_size=32,
                  bigram_dim=16, ve_dim=8, ve_layers="1", xsa_last_n=2, rope_dims=4, compute_dtype="float32",
                  attention_impl="jnp", mlp_impl="jnp")


def tiny_model_loss_and_grads(variants: dict[str, dict]) -> dict[str, tuple]:
    """(loss, grads) of a 2-layer float32 model (TINY_MODEL, perturbed weights,
    random tokens) for each variant's config fields, one program per variant:
    for checking a kernel path against the jnp path through the whole model."""
    cfg = ModelConfig(**TINY_MODEL)
    params = model.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), params)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 64)
    loss_and_grads = jax.jit(jax.value_and_grad(model.loss), static_argnums=1)
    return {name: loss_and_grads(params, dataclasses.replace(cfg, **fields), tokens, jnp.roll(tokens, -1, axis=1))
            for name, fields in variants.items()}


def triton_kernels_lowered(fn, *args) -> list[str]:
    """The names of the Pallas calls in jit(fn)(*args) (shapes or arrays) lowered by
    Pallas's Triton backend, in a program exported for CUDA: lowering only, so it runs
    on any machine and catches what Pallas's Triton lowering refuses (the CPU tests run
    the kernels in its interpreter, which accepts more). jax.default_backend answers
    "gpu" while it traces, so the kernels take their GPU path. fn should be the test's
    own function: JAX's jit cache keys on it, so jitting the same fn again on the CPU,
    at the same shapes, would find this GPU path's trace."""
    from jax import export

    real = jax.default_backend
    jax.default_backend = lambda: "gpu"
    try:
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    finally:
        jax.default_backend = real
    return re.findall(r'@__gpu\$xla\.gpu\.triton\(.*?name = "([^"]+)"', exported.mlir_module(), flags=re.DOTALL)


def round_to_bf16(x) -> np.ndarray:
    """Values rounded to float32, then to bf16 (ties to even), as float32."""
    return np.asarray(jnp.asarray(np.asarray(x, np.float32)).astype(jnp.bfloat16).astype(jnp.float32))


def reference_source(relpath: str, *names: str) -> str:
    """The source of the definitions `names` (functions, classes, assignments) of a
    reference file (their decorators dropped), to run them here without importing
    the whole file (its GPU-only imports)."""
    path = REFERENCE / relpath
    if not path.is_file():
        missing(f"reference code {path} not present (set GOLF_JAX_REFERENCE)")
    text = path.read_text()
    lines, parts, found = text.splitlines(), [], set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        if name in names:  # from its `def` or assignment line: a function's decorators are left out
            found.add(name)
            parts.append(textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno])))
    if set(names) - found:
        pytest.fail(f"{path}: definitions {sorted(set(names) - found)} not found")
    return "\n\n".join(parts)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    """The fixtures' model, on the reference-precision path on any backend."""
    cfg = ModelConfig(**json.loads(fixture_path("model_tiny_config.json").read_text()))
    return dataclasses.replace(cfg, compute_dtype="float32", attention_impl="jnp")


@pytest.fixture(scope="session")
def tiny_ref() -> dict:
    with np.load(fixture_path("model_tiny.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def tiny_params(tiny_ref, tiny_cfg):
    state = {k.removeprefix("param/"): v for k, v in tiny_ref.items() if k.startswith("param/")}
    return compat.params_from_reference(state, tiny_cfg)


# The 1.0611 record's model fixtures, made by tests/frontier_reference/generate.py and checked in.
FRONTIER_FIXTURES = Path(__file__).resolve().parent / "frontier_reference"


def frontier_model_config(h: dict, bos_id: int) -> ModelConfig:
    """golf_jax's model fields for the 1.0611 reference's Hyperparameters (the
    attribute names of its `Hyperparameters`), on the float32 jnp path."""
    assert not h["attn_out_gate_enabled"] and not h["gated_attn_enabled"] and h["sparse_attn_gate_init_std"] == 0
    return ModelConfig(
        vocab_size=h["vocab_size"], num_layers=h["num_layers"], model_dim=h["model_dim"], num_heads=h["num_heads"],
        num_kv_heads=h["num_kv_heads"], mlp_mult=h["mlp_mult"], tie_embeddings=h["tie_embeddings"],
        tied_embed_init_std=h["tied_embed_init_std"], logit_softcap=h["logit_softcap"], rope_base=h["rope_base"],
        qk_gain_init=h["qk_gain_init"], xsa_last_n=h["xsa_last_n"], rope_dims=h["rope_dims"], ln_scale=h["ln_scale"],
        bigram_vocab_size=0, ve_enabled=False,  # the 1.0611 record has neither
        rope_ntk_base_len=h["train_seq_len"] if h["rope_yarn"] else 0,
        num_loops=h["num_loops"], loop_start=h["loop_start"], loop_end=h["loop_end"],
        skip_gates=h["skip_gates_enabled"], parallel_start_layer=h["parallel_start_layer"],
        parallel_final_lane=h["parallel_final_lane"], sparse_attn_gate=h["sparse_attn_gate_enabled"],
        sparse_attn_gate_scale=h["sparse_attn_gate_scale"], gate_window=h["gate_window"],
        smear_gate="windowed" if h["smear_gate_enabled"] else "none", bos_id=bos_id,
        compute_dtype="float32", attention_impl="jnp", mlp_impl="jnp")


@pytest.fixture(scope="session")
def frontier_ref() -> tuple[ModelConfig, dict, dict]:
    """(config, the generator's JSON, its arrays) of the 1.0611 record's tiny model."""
    return load_frontier_ref()


def load_frontier_ref() -> tuple[ModelConfig, dict, dict]:
    """The `frontier_ref` fixture, for a test's subprocess (several devices)."""
    config, arrays = FRONTIER_FIXTURES / "model_frontier_tiny_config.json", FRONTIER_FIXTURES / "model_frontier_tiny.npz"
    if not config.is_file() or not arrays.is_file():
        missing(f"{FRONTIER_FIXTURES}: fixtures not present (python tests/frontier_reference/generate.py)")
    meta = json.loads(config.read_text())
    with np.load(arrays) as z:
        ref = {k: z[k] for k in z.files}
    return frontier_model_config(meta["hyperparameters"], meta["bos_id"]), meta, ref


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = datasets.shared_data_dir()
    if root is None:
        missing("embedded data (../shared/data) not present")
    return root


@pytest.fixture(scope="session")
def pydoc_data(tmp_path_factory) -> Path:
    """The pydoc fallback dataset (its own tokenizer), built once per run in a
    cache of the run's own: a second tokenizer beside the competition's."""
    cache = tmp_path_factory.mktemp("golf_jax_cache")
    before = os.environ.get("GOLF_JAX_CACHE")
    os.environ["GOLF_JAX_CACHE"] = str(cache)
    try:
        return datasets.pydoc_dataset(1024)
    finally:
        if before is None:
            del os.environ["GOLF_JAX_CACHE"]
        else:
            os.environ["GOLF_JAX_CACHE"] = before


@pytest.fixture(scope="session")
def caseops_tokenizer() -> Path:
    """The 1.0611 record's SP8192 CaseOps tokenizer (../shared/reference)."""
    path = REFERENCE / datasets.CASEOPS_TOKENIZER
    if not path.is_file():
        missing(f"the 1.0611 record's tokenizer {path} not present (set GOLF_JAX_REFERENCE)")
    return path


@pytest.fixture(scope="session")
def caseops_data(tmp_path_factory, shared_data, caseops_tokenizer) -> Path:
    """The embedded tinyshakespeare corpus prepared with that tokenizer, built
    once per run in a cache of the run's own."""
    cache = tmp_path_factory.mktemp("golf_jax_caseops_cache")
    before = os.environ.get("GOLF_JAX_CACHE")
    os.environ["GOLF_JAX_CACHE"] = str(cache)
    try:
        return datasets.caseops_dataset(caseops_tokenizer)
    finally:
        if before is None:
            del os.environ["GOLF_JAX_CACHE"]
        else:
            os.environ["GOLF_JAX_CACHE"] = before


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason="needs a GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)
