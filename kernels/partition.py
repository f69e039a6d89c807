"""Kernels as ops that XLA's SPMD partitioner splits along their rows."""

from __future__ import annotations

from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def row_partitioned(fn, row_args: tuple[int, ...], n_out: int, rule: str, replicated: tuple[str, ...]):
    """fn (2-D operands, rows first) as one op that XLA's SPMD partitioner
    splits along the rows: rows sharded as the first operand's are, weights
    replicated, each device running fn on its rows. Without it a sharded
    batch (TTT over several GPUs) would be all-gathered around the kernels'
    custom calls, which XLA cannot partition."""
    f = custom_partitioning(fn)

    def shardings(mesh, arg_shapes):
        spec = arg_shapes[0].sharding.spec
        rows = NamedSharding(mesh, P(spec[0] if len(spec) else None, None))
        whole = NamedSharding(mesh, P(None, None))
        return rows, tuple(rows if i in row_args else whole for i in range(len(arg_shapes)))

    def infer(mesh, arg_shapes, result_shape):
        rows, _ = shardings(mesh, arg_shapes)
        return rows if n_out == 1 else (rows,) * n_out

    def partition(mesh, arg_shapes, result_shape):
        rows, args = shardings(mesh, arg_shapes)
        return mesh, fn, (rows if n_out == 1 else (rows,) * n_out), args

    f.def_partition(partition=partition, infer_sharding_from_operands=infer,
                    propagate_user_sharding=lambda mesh, user_shape: user_shape.sharding,
                    sharding_rule=rule, need_replication_factors=replicated)
    return f
