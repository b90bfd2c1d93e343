"""Tensor/sequence/pipeline/data parallelism: process groups, mappings, layers, losses."""

from megalite.parallel.state import ParallelState, build_parallel_state, check_layout  # noqa: F401
