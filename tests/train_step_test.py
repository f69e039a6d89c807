"""The training step's Parallel Muon against the reference: the optimizer as train builds it,
inside shard_map with the banks split over two (host) devices. The step as a whole (accumulation,
EMA, SWA, QAT, 1/2/4/8 devices agreeing, resume) is tested through training in train_test.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from tests.conftest import REPO, fixture_path


MUON_SHARDED = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from golf_jax import optim, train_step
    from golf_jax.config import OptimizerConfig
    z = np.load(sys.argv[2])
    banks = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
    # As train builds it: clip -> multi_transform -> Muon; the fixture's Muon has no clip (1e30 never clips).
    cfg = OptimizerConfig(matrix_lr=0.025, muon_momentum=0.95, muon_momentum_warmup_steps=0, muon_weight_decay=0.04,
                          muon_momentum_dtype="float32", muon_ns_dtype="float32", grad_clip_norm=1e30)
    tx = optim.build_optimizer(cfg, train_step.AXIS)
    mesh = train_step.make_mesh(2)
    state = train_step.init_state({b: jnp.asarray(z["init/" + b]) for b in banks}, tx, mesh, swa=False)
    specs = train_step.state_specs(state)
    step = jax.jit(jax.shard_map(lambda s, g: train_step.parallel_update(tx, g, s.opt_state, s.params, 2, 1), mesh=mesh,
                                 in_specs=(specs, P()), out_specs=(P(), specs.opt_state), check_vma=False))
    params, opt_state, out = state.params, state.opt_state, {}
    for k in range(2):
        # Every device holds the whole gradient: the reduce-scatter sums 2 copies and divides by 2.
        updates, opt_state = step(state._replace(params=params, opt_state=opt_state),
                                  {b: jnp.asarray(z[f"grad{k}/{b}"]) for b in banks})
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        out[k] = {b: np.asarray(params[b]).tolist() for b in banks}
    # Parallel Muon: each device holds half of every bank's momentum.
    momenta = [x for path, x in jax.tree_util.tree_leaves_with_path(opt_state) if train_step._is_bank(path) and x.ndim]
    halves = all(x.addressable_shards[0].data.shape[0] * 2 == x.shape[0] for x in momenta)
    print(json.dumps({"momenta": len(momenta), "halves": halves, "after": out}))
""")


def test_parallel_muon_as_built_for_training_matches_the_reference():
    """The optimizer as train builds it, inside shard_map with the banks split over two
    devices, against the reference's two Muon steps (float32: muon.npz's _fp32 results)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", MUON_SHARDED, str(REPO), str(fixture_path("muon.npz"))], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["momenta"] == 4 and result["halves"]  # each bank's momentum split over the two devices
    after = result["after"]
    with np.load(fixture_path("muon.npz")) as z:
        prev = {b: z[f"init/{b}"] for b in after["0"]}
        for k in ("0", "1"):
            for b, got in after[k].items():
                ref = z[f"after{k}_fp32/{b}"]
                # As the unsharded float32 check (optim_test): a float32 port lands near 3e-6 of the step.
                assert np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref - prev[b]) <= 1e-4, (k, b)
            prev = {b: z[f"after{k}_fp32/{b}"] for b in after[k]}
