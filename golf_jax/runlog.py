"""What a run reports: its log lines and records, its loss plot, the XLA
compilations it causes and its peak device memory. Used by training and by the
stages after it, so neither imports the other for them."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import threading
from pathlib import Path

import jax


class RunLog:
    """Human log lines (console and train.log) and machine records
    (train.jsonl). Only process 0 of a multi-process run writes them; the
    others' logs are silent, so the files hold each line once."""

    def __init__(self, out_dir: Path, bar=None, active: bool = True):
        self.active = active
        if active:
            self.text = open(out_dir / "train.log", "a", buffering=1)
            self.jsonl = open(out_dir / "train.jsonl", "a", buffering=1)
        self.bar = bar

    def line(self, msg: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(msg)
            self.text.write(msg + "\n")

    def record(self, **fields) -> None:
        if self.active:
            self.jsonl.write(json.dumps(fields) + "\n")

    def close(self) -> None:
        if self.active:
            self.text.close()
            self.jsonl.close()


def plot_curves(train_points, val_points, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train_points:
        s, v = zip(*train_points)
        ax.plot(s, v, lw=0.8, label="train loss")
    if val_points:
        s, v = zip(*val_points)
        ax.plot(s, v, "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The threads that compile the evaluation's programs beside the pipeline's stages (the reload's,
# golf_jax/quantize.py and golf_jax/ttt.py): a stage's CompileCounter counts theirs apart.
BACKGROUND_THREADS = "golf_jax_precompile"


def thread_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool whose threads are named after the calling thread, so that their compilations
    count as the caller's would (BACKGROUND_THREADS' or not)."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"{threading.current_thread().name}-pool")


class CompileCounter:
    """Counts XLA compilations (any function) while active; those inside
    `aside()` are counted apart, in `aside_count`, and those in BACKGROUND_THREADS
    (the evaluation's programs compiling beside a stage) in `beside_count`.

    A training loop's promise is no compilation after its first step
    (`first_step_done`) but the first call of each program used only later
    (inside `first_use(program)`: the looped step, the looped validation);
    `recompilations` counts the others. `names`: the compilations by
    program name ("jit(step)"); `seconds`: the time they took."""

    EVENT = "/jax/core/compile/backend_compile_duration"
    # tracing, lowering and XLA's compilation: the seconds a first call spends before it runs
    SECONDS_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                      EVENT)

    def __init__(self):
        self.count = 0
        self.seconds = 0.0  # SECONDS_EVENTS' durations, aside() or not, not beside
        self.aside_count = 0
        self.beside_count = 0
        self._aside = False
        self.at_first_step: int | None = None
        self._programs: set = set()
        self.first_use_count = 0
        self.names: collections.Counter = collections.Counter()

    def first_step_done(self) -> None:
        if self.at_first_step is None:
            self.at_first_step = self.count

    @contextlib.contextmanager
    def first_use(self, program):
        counted = program not in self._programs and self.at_first_step is not None
        self._programs.add(program)
        before = self.count
        yield
        if counted:
            self.first_use_count += self.count - before

    @property
    def recompilations(self) -> int:
        return self.count - (self.at_first_step or 0) - self.first_use_count

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        beside = threading.current_thread().name.startswith(BACKGROUND_THREADS)
        if event in self.SECONDS_EVENTS and not beside:
            self.seconds += duration
        if event == self.EVENT:
            self.names[kwargs.get("fun_name")] += 1
            if beside:
                self.beside_count += 1
            elif self._aside:
                self.aside_count += 1
            else:
                self.count += 1

    @contextlib.contextmanager
    def aside(self):
        self._aside = True
        try:
            yield
        finally:
            self._aside = False

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def peak_memory_bytes() -> int | None:
    """The allocator's peak bytes in use on this process's first device (not the preallocated pool)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")
