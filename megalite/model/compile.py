"""Regional compilation: each decoder layer's body is compiled, not the whole model.

As in torchtitan, the unit is one layer: layers share a structure, so (with dynamo's default
inlining of nn.Modules, which passes parameters as graph inputs) the first layer's graph serves all
of them, and compile time does not grow with depth. The embedding, the head and the loss stay eager:
their vocab-parallel collectives and Triton kernels gain nothing from being traced.

What is compiled is `DecoderLayer._forward`, the body inside the full-recompute checkpoint, so
activation checkpointing stays an eager wrapper around a compiled region (its custom RNG-tracker
context cannot be traced). Inside the body:
* The TP/SP mappings are custom autograd Functions around gloo/NCCL collectives. Dynamo cannot
  trace a c10d call on an explicit ProcessGroup inside a Function, so it breaks the graph cleanly
  around each `.apply` and runs it eagerly; the matmuls, norms, RoPE and SwiGLU between them
  compile. Losses equal eager ones (tests/model/test_compile.py checks TP1, TP2+SP and PP2).
* The Triton kernels (norm_impl/mlp_impl=triton) are called through their autograd Functions,
  which dynamo traces as user-defined Triton kernels on a GPU; under TRITON_INTERPRET they run
  eagerly behind a graph break.
Compiled parameters keep their names (the module is not wrapped), so checkpoints do not change.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def compile_layers(model: nn.Module) -> int:
    """Compiles every decoder layer of a LlamaModel chunk in place; returns how many."""
    layers = getattr(model, "layers", {})
    for layer in layers.values():
        # An instance attribute shadows the method: forward() (and its checkpoint) calls the compiled body.
        layer._forward = torch.compile(layer._forward)
    return len(layers)
