"""Regional compilation: each decoder layer's body is compiled, not the whole model.

As in torchtitan, the unit is one layer: layers share a structure, so (with dynamo's default
inlining of nn.Modules, which passes parameters as graph inputs) the first layer's graph serves all
of them, and compile time does not grow with depth. The embedding, the head and the loss stay eager:
their vocab-parallel collectives and Triton kernels gain nothing from being traced.

What is compiled is `DecoderLayer._forward`, the body inside the full-recompute checkpoint, so
activation checkpointing stays an eager wrapper around a compiled region (its custom RNG-tracker
context cannot be traced). Inside the body:
* The TP/SP mappings are custom autograd Functions around collectives. Dynamo traces the SP ones
  (all-gather / reduce-scatter along the sequence) into the graph as functional collectives, in
  forward and backward (checked on gloo: no graph break at TP2+SP with tp_comm_overlap=false). The
  plain-TP all-reduce works in place (mark_dirty) and the overlapped column-parallel Function
  (tp_comm_overlap, the default) issues async collectives; dynamo traces neither, so they run
  eagerly behind clean graph breaks.
  Traced collectives report to `comm.count_comm` only while tracing, so count traffic eagerly.
* The Triton kernels (norm_impl/mlp_impl=triton) are called through their autograd Functions,
  which dynamo traces as user-defined Triton kernels on a GPU; under TRITON_INTERPRET they run
  eagerly behind a graph break.
Compiled parameters keep their names (the module is not wrapped), so checkpoints do not change.
Decoding with a KV cache stays eager.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn


def compile_layers(model: nn.Module) -> int:
    """Compiles every decoder layer of a LlamaModel chunk in place; returns how many."""
    layers = getattr(model, "layers", {})
    for layer in layers.values():
        # An instance attribute shadows the method: forward() (and its checkpoint) calls the compiled body.
        layer._forward = _compiled_body(layer._forward)
    return len(layers)


def _compiled_body(eager: Callable[..., Any]) -> Callable[..., Any]:
    compiled = torch.compile(eager)

    def body(x, cos, sin, doc_ids, pending, kv_cache=None):
        if kv_cache is not None:
            # Incremental decoding (generation, RL rollouts): shapes change every token, so this
            # stays eager rather than recompiling per length.
            return eager(x, cos, sin, doc_ids, pending, kv_cache)
        return compiled(x, cos, sin, doc_ids, pending)

    return body
