"""Tooling: benchmarks and profiling of the pipeline, not part of it.

The rule, in one place: `golf_jax.artifact.code_bytes` counts the code needed
to train, quantise, load and evaluate a model, i.e. every `*.py` under
`golf_jax/` and `kernels/` except this folder. Nothing outside `tools` may
import from it.
"""
