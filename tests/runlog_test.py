"""The run log's compilation counter, with the suite's persistent compilation cache on."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from golf_jax.runlog import CompileCounter


def test_compile_counter_counts_compilations_and_programs_read_from_the_cache():
    f = jax.jit(lambda x: jnp.sin(x) * 3 + 0.125)  # a program no other test builds
    x = jnp.arange(7.0)
    with CompileCounter() as compiles:
        f(x).block_until_ready()
        f(x).block_until_ready()  # in memory: not compiled again
        assert compiles.count == 1
        jax.clear_caches()  # as a new process would: the persistent cache (tests/conftest.py) has it
        f(x).block_until_ready()
        assert compiles.count == 2
