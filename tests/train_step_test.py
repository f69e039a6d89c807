"""The training step's Parallel Muon against the reference: the optimizer as train builds it,
inside shard_map with the banks split over two (host) devices. The step as a whole (accumulation,
EMA, SWA, QAT, 1/2/4/8 devices agreeing, resume) is tested through training in train_test.py."""

from __future__ import annotations

import textwrap

import numpy as np

from tests.conftest import REPO, fixture_path, run_on_cpu_devices


MUON_SHARDED = textwrap.dedent("""
    import sys, json
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
    result = run_on_cpu_devices(MUON_SHARDED, str(fixture_path("muon.npz")))
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


def test_step_with_packed_rows_and_the_loop_is_the_models_own_loss():
    """The step's loss, with segments and the layer loop, against model.loss on each
    micro-batch's row with its segment ids (the gradient is that loss's: jax.grad)."""
    import dataclasses

    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from golf_jax import cli, model, optim, packing, train_step

    cfg = cli.load_config_file(REPO / "configs/frontier_smoke.py")
    cfg = dataclasses.replace(
        # Five layers: layers 1-2 looped (encoder [0,1,2,1], decoder [2,1,2,3,4]), two lanes at layer 4.
        cfg, model=dataclasses.replace(cfg.model, vocab_size=256, model_dim=32, num_heads=2, num_kv_heads=1,
                                       num_layers=5, xsa_last_n=5, loop_start=1, loop_end=2, parallel_start_layer=4),
        data=dataclasses.replace(cfg.data, train_seq_len=16, train_batch_tokens=128, micro_batches_per_step=2),
    ).validate()
    mcfg, rng = cfg.model, np.random.default_rng(0)
    tokens = rng.integers(2, 256, (2, 65)).astype(np.int32)
    tokens[0, [5, 9, 40]] = tokens[1, [0, 30]] = mcfg.bos_id  # row 0 starts inside a document
    rows = [packing.make_segments(packing.document_segments(np.flatnonzero(t[:-1] == 1), 64, 16)[0], 64, 16)
            for t in tokens]
    xs, ys = tokens[:, None, :-1], tokens[:, None, 1:]
    segs = packing.Segments(*map(np.stack, zip(*rows)))  # [accum, rows (1), ...]
    mesh = train_step.make_mesh(1)
    tx = optim.build_optimizer(cfg.optimizer, train_step.AXIS)
    # Every parameter away from its init (zero gates would hide the gates' inputs).
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.05, p.shape).astype(p.dtype),
                          model.init_params(mcfg, jax.random.key(1)))
    state = train_step.init_state(params, tx, mesh, False)
    on_mesh = jax.device_put((xs, ys, segs), NamedSharding(mesh, P(None, train_step.AXIS)))
    _, loss = train_step.make_train_step(cfg, mesh, tx, state)(state, *on_mesh[:2], 1.0, False, False, on_mesh[2],
                                                                True)

    @jax.jit
    def direct(p):
        def mean_loss(looping=True, segmented=True):
            return sum(model.loss(p, mcfg, xs[a], ys[a], looping=looping,
                                  **({"segments": jax.tree.map(lambda s: s[a], segs)} if segmented else {}))
                       for a in range(2)) / 2
        return mean_loss(), mean_loss(looping=False), mean_loss(segmented=False)

    want, unlooped, unsegmented = direct(params)
    # float32 (the CPU's compute dtype); the step sums the micro-batches' losses in another order.
    assert abs(float(loss) / float(want) - 1) <= 1e-6
    # The loop and the segments reach the model: without either the loss is another.
    assert abs(float(unlooped) - float(want)) > 1e-3 and abs(float(unsegmented) - float(want)) > 1e-3
