"""Multi-process (multi-host) runs: `jax.distributed.initialize()` from flags
or the environment, and what the training loop needs so that several
processes, each driving its own GPUs, take the same decisions.

One process per host (or per GPU) runs the same command; together they form
one global device mesh. Each process loads only its own devices' spans of
the token stream (`train_step.local_ranks`), orbax writes every checkpoint once
(each array by one of its replicas, the metadata by process 0), and process 0
alone writes logs, plots, the summary, the final model and the artifact.

    # on host 0 (the coordinator: any free port), then the same with --process-id 1 on host 1
    python train.py --config configs/record.py --coordinator-address host0:8476 --num-processes 2 --process-id 0

The same from the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID (and JAX's own JAX_LOCAL_DEVICE_IDS). `--distributed` alone lets
JAX detect them on a SLURM, Open MPI or Kubernetes cluster.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

import jax

from golf_jax.config import ConfigError

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-process (multi-host) runs; default: one process, its local devices")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help=f"process 0's address, reachable from every process (env {ENV['coordinator_address']})")
    g.add_argument("--num-processes", type=int, default=None, help=f"env {ENV['num_processes']}")
    g.add_argument("--process-id", type=int, default=None, help=f"0 .. num-processes - 1 (env {ENV['process_id']})")
    g.add_argument("--local-device-ids", default=None, metavar="IDS",
                   help="comma-separated GPU ids this process drives (default: all it sees; env JAX_LOCAL_DEVICE_IDS)")
    g.add_argument("--distributed", action="store_true",
                   help="initialise even with none of the above: JAX detects them on SLURM, Open MPI, Kubernetes")


def settings(args: argparse.Namespace, environ=os.environ) -> dict[str, Any] | None:
    """jax.distributed.initialize's arguments from flags, else the environment;
    None for a single-process run. Raises ConfigError naming a bad value."""
    out: dict[str, Any] = {}
    for name, env in ENV.items():
        value = getattr(args, name, None)
        if value is None and environ.get(env):
            value = environ[env]
            if name != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ConfigError(f"{env}={value!r}: not an integer") from None
        if value is not None:
            out[name] = value
    ids = getattr(args, "local_device_ids", None)
    if ids:
        try:
            out["local_device_ids"] = [int(i) for i in ids.split(",")]
        except ValueError:
            raise ConfigError(f"--local-device-ids {ids!r}: expected comma-separated integers") from None
    if not out and not getattr(args, "distributed", False):
        return None
    n, pid = out.get("num_processes"), out.get("process_id")
    if n is not None and n < 1:
        raise ConfigError(f"--num-processes {n}: must be at least 1")
    if n is not None and pid is not None and not 0 <= pid < n:
        raise ConfigError(f"--process-id {pid}: must be in 0 .. {n - 1} for --num-processes {n}")
    return out


def initialize(args: argparse.Namespace) -> bool:
    """Join the run's processes when the flags or environment ask for it
    (before anything touches a device); returns whether it did."""
    kwargs = settings(args)
    if kwargs is None:
        return False
    # CPU collectives across processes (the two-process test, and CPU-only
    # clusters) need gloo; GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {e}")
    return True


def is_primary() -> bool:
    """Process 0: the one that writes logs, reports and the final model."""
    return jax.process_index() == 0


def local_copy(tree):
    """A replicated pytree as arrays on this process's first device holding
    them: what single-device work (validation, quantisation) runs on, with or
    without other processes."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data if isinstance(x, jax.Array) else x, tree)


def wait_for_all(name: str = "golf_jax/end", timeout_s: float = 7 * 24 * 3600) -> None:
    """Block until every process reaches the same point: at the end of
    train.py the other processes wait here for process 0's stages after
    training, instead of in JAX's exit barrier, whose 300 s timeout is
    shorter than a full validation set's final evaluation."""
    if jax.process_count() > 1:
        _client().wait_at_barrier(name, int(timeout_s * 1000))


def _client():
    # The coordinator's key-value store, as orbax uses it for its barriers;
    # JAX exposes it only through this module.
    from jax._src.distributed import global_state
    return global_state.client


class StepAgreement:
    """Process 0's host-side decisions for each step, adopted by every process.

    The wall clock drives the warmdown's learning-rate multiplier, late QAT,
    SWA and the 600 s stop; a pre-emption signal may reach one process and not
    another. Each process reading its own clock would give replicated
    parameters different updates, or leave one process waiting in a collective
    for a step the others never run. So process 0 publishes its decision for
    step s in the coordinator's key-value store and the others block on it
    before dispatching step s: host round trips only, never a device sync, so
    the devices stay one step ahead of the hosts. Other processes forward a
    SIGTERM they receive to process 0, which stops everyone at one step.
    With one process the decisions pass through untouched.
    """

    PREFIX = "golf_jax/step"

    def __init__(self, timeout_s: float = 3600.0, client=None):
        self.index = jax.process_index()
        self.primary = self.index == 0
        self.client = client if client is not None else (_client() if jax.process_count() > 1 else None)
        self.timeout_ms = int(timeout_s * 1000)
        self._signalled = False

    def decide(self, step: int, make: Callable[[bool], dict], sigterm: bool) -> dict:
        """The decision for `step`: on process 0 `make(stop_requested)`, where
        stop_requested includes a SIGTERM forwarded by any process; elsewhere
        process 0's, read back. Decisions are JSON-able dicts."""
        if self.client is None:
            return make(sigterm)
        key = f"{self.PREFIX}/{step}"
        if self.primary:
            if not sigterm:
                sigterm = bool(self.client.key_value_dir_get(f"{self.PREFIX}_sigterm/"))
            decision = make(sigterm)
            self.client.key_value_set(key, json.dumps(decision))
            return decision
        if sigterm and not self._signalled:
            self.client.key_value_set(f"{self.PREFIX}_sigterm/{self.index}", "1")
            self._signalled = True
        return json.loads(self.client.blocking_key_value_get(key, self.timeout_ms))

    def done(self, step: int) -> None:
        """Every process has read the decision for `step` (its collectives
        ran), so process 0 drops it from the store."""
        if self.client is not None and self.primary:
            self.client.key_value_delete(f"{self.PREFIX}/{step}")
