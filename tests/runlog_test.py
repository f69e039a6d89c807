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


def test_first_use_of_a_program_after_the_first_step_is_not_a_recompilation():
    f = jax.jit(lambda x, looping: jnp.cos(x) * (2.0 if looping else 5.0) - 0.375, static_argnums=1)
    x = jnp.arange(5.0)
    with CompileCounter() as compiles:
        with compiles.first_use(("step", False)):
            f(x, False).block_until_ready()  # before the first step: counted in at_first_step
        compiles.first_step_done()
        assert compiles.at_first_step == 1 and compiles.recompilations == 0
        with compiles.first_use(("step", True)):  # the loop switch: a program's first call
            f(x, True).block_until_ready()
        assert compiles.first_use_count == 1 and compiles.recompilations == 0
        jax.clear_caches()
        with compiles.first_use(("step", True)):  # a program compiling again is a recompilation
            f(x, True).block_until_ready()
        assert compiles.recompilations == 1
    assert compiles.names["jit(<lambda>)"] == 3


def test_compilations_in_background_threads_are_counted_beside():
    """The evaluation's programs compiling beside a stage (threads named BACKGROUND_THREADS, and
    the pools such a thread starts: `thread_pool`) count in beside_count, not as the stage's own;
    a pool started by the stage's own thread counts as its own."""
    import concurrent.futures

    from golf_jax.runlog import BACKGROUND_THREADS, thread_pool

    programs = [jax.jit(lambda x, c=c: jnp.tanh(x) * c + 0.0625) for c in (7.0, 9.0, 11.0)]  # built nowhere else
    x = jnp.arange(3.0)

    def in_a_pool(f):
        with thread_pool(1) as pool:
            return pool.submit(lambda: f(x).block_until_ready()).result()

    with CompileCounter() as compiles:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=BACKGROUND_THREADS) as background:
            background.submit(lambda: programs[0](x).block_until_ready()).result()
            background.submit(in_a_pool, programs[1]).result()
        in_a_pool(programs[2])
    assert (compiles.beside_count, compiles.count) == (2, 1)
    assert compiles.names["jit(<lambda>)"] == 3  # every program by name
