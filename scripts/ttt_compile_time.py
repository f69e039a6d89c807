"""How long the phased TTT's two programs take to compile on this machine (the CPU
suite's slowest compilations: tests/ttt_lora_test.py's fixture, the reduced optimisation
the suite compiles with), one at a time: for choosing XLA flags for the test suite.

    XLA_FLAGS=--xla_cpu_use_fusion_emitters=true python scripts/ttt_compile_time.py   # XLA's default
    XLA_FLAGS=--xla_cpu_use_fusion_emitters=false python scripts/ttt_compile_time.py  # the suite's

(Without the flag in XLA_FLAGS, importing tests/conftest.py sets it to false, as for the suite.)

Needs the reference's frontier fixtures (tests/frontier_reference) and ../shared.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)  # as tests/conftest.py compiles on the CPU

from golf_jax import ttt_lora, ttt_schedule  # noqa: E402
from golf_jax.train_step import make_mesh  # noqa: E402
from tests.conftest import load_frontier_ref  # noqa: E402
from tests.ttt_lora_test import load_fixture  # noqa: E402


def main() -> None:
    cfg, params, tokens, _, _, init_a = load_fixture(load_frontier_ref())
    t = cfg.ttt
    place = ttt_lora.RowPlacement(make_mesh(1, local=True), t.lora_batch_docs, t.lora_compact_rows)
    lora = place.factors(ttt_lora.fresh_lora(init_a(0, t.lora_batch_docs), cfg.model, t))
    _, lengths = ttt_schedule.find_documents(np.asarray(tokens), cfg.model.bos_id)
    first_program = ttt_schedule.chunk_programs(lengths, t)[:1]
    for name, programs, global_phases in (("chunk step", first_program, False), ("global SGD step", [], True)):
        t0 = time.perf_counter()
        ttt_lora.compile_ahead(place.replicated(params), cfg, lora, programs, place, global_phases)
        print(f"{name}: {time.perf_counter() - t0:.1f} s (tracing, lowering and compiling)")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


if __name__ == "__main__":
    main()
