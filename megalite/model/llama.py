"""The Llama-family decoder: embedding -> N pre-norm layers -> norm -> vocab-parallel head.

A pipeline stage builds only its part: `layer_ids` (global layer numbers, kept in parameter names
so checkpoints are layout-independent), the embedding on the first stage (`pre_process`) and the
norm/head/loss on the last (`post_process`). Activations are [seq, batch, hidden]; under SP the
sequence dim is sharded over TP between the TP regions.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.config import ConfigError, ModelConfig
from megalite.model.block import DecoderLayer, add_norm
from megalite.model.kv_cache import KVCache
from megalite.model.norm import RMSNorm
from megalite.model.rope import inv_frequencies, rope_cos_sin
from megalite.model.spec import loss_fn, overlapped_vocab_parallel_loss
from megalite.parallel.layers import VocabParallelEmbedding, padded_vocab_size
from megalite.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence,
    gather_from_sequence_replicated,
    gather_from_tp,
)
from megalite.parallel.rng import RNGTracker
from megalite.parallel.sharding import (
    TPShard,
    get_tp_shard,
    mark_tied_embedding,
    split_for_rank,
    tag_param,
    tied_copy_of,
)
from megalite.parallel.state import ParallelState


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, rng: RNGTracker | None = None, *,
                 layer_ids: list[int] | None = None, pre_process: bool = True, post_process: bool = True,
                 device=None) -> None:
        super().__init__()
        self.cfg, self.ps = cfg, ps
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_ids = list(range(cfg.num_layers)) if layer_ids is None else list(layer_ids)
        self.vocab_padded = padded_vocab_size(cfg.vocab_size, ps.tp, cfg.make_vocab_size_divisible_by)
        self.local_vocab = self.vocab_padded // ps.tp
        self.vocab_start = ps.tp_rank * self.local_vocab
        if pre_process:
            self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ps,
                                                    cfg.make_vocab_size_divisible_by, device=device)
            if cfg.tie_embeddings and cfg.output_head == "lm":
                mark_tied_embedding(self.embedding.weight)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, ps, rng, device=device) for i in self.layer_ids})
        if cfg.output_head not in ("lm", "score"):
            raise ConfigError(f"model.output_head must be lm or score, got '{cfg.output_head}'")
        self.scores = cfg.output_head == "score"
        if post_process:
            self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_impl, partial_grad=ps.sp,
                                      device=device, ps=ps)
        if post_process and self.scores:
            # A scalar per position, replicated over TP: under SP each rank scores its own tokens,
            # so the weight's grad is partial and is summed over TP like the norms'.
            self.score = tag_param(nn.Parameter(torch.empty(1, cfg.hidden_size, device=device)), "normal",
                                   sync_tp_grad=ps.sp)
        elif post_process:
            if not cfg.tie_embeddings or not pre_process:
                # With tied embeddings split over a pipeline, the last stage keeps its own copy,
                # initialized from the same key and kept in sync by an all-reduce of the grads.
                self.head = tag_param(nn.Parameter(torch.empty(self.local_vocab, cfg.hidden_size, device=device)),
                                      "normal", TPShard(0, (self.vocab_padded,), logical=cfg.vocab_size))
                if cfg.tie_embeddings:
                    mark_tied_embedding(self.head, copy_of="embedding.weight")
            self.loss = loss_fn(cfg.loss_impl)
        self.register_buffer("inv_freq", inv_frequencies(cfg).to(device), persistent=False)

    # ------------------------------------------------------------------------------------------
    def head_weight(self) -> torch.Tensor:
        return self.head if hasattr(self, "head") else self.embedding.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Fills every parameter from its global tensor, seeded by (seed, global name): the same
        model for any TP/PP layout. Output projections get std / sqrt(2 * num_layers)."""
        std = self.cfg.init_std
        scaled = std / math.sqrt(2.0 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            kind = getattr(p, "init", "normal")
            if kind in ("ones", "zeros"):
                p.fill_(1.0 if kind == "ones" else 0.0)
                continue
            key = tied_copy_of(p) or name
            shard = get_tp_shard(p)
            shape = list(p.shape)
            if shard is not None:
                shape[shard.dim] = shard.logical or shard.global_size
            gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            full = torch.empty(shape, device=p.device, dtype=torch.float32)
            full.normal_(0.0, scaled if kind == "scaled" else std, generator=gen)
            p.copy_(split_for_rank(full, shard, self.ps.tp_rank, self.ps.tp) if shard is not None else full)

    # ------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """First stage: tokens [b, s]; other stages: hidden [s(/tp), b, h] from the previous stage.
        Returns hidden for the next stage, per-token losses [b, s] when `labels` are given, or
        vocab-parallel logits [b, s, V/tp] otherwise; with the score head, scores [b, s].
        With `kv_cache` (inference, no SP): `tokens` are the positions after the cached ones,
        attention reads and extends the cache, and only the last position's output is computed
        ([b, 1, ...]): the next token's."""
        x = self.embedding(tokens) if self.pre_process else hidden
        s = x.shape[0] * (self.ps.tp if self.ps.sp else 1)
        b = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(s, device=x.device).unsqueeze(0).expand(b, s)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype if x.is_floating_point() else torch.float32)
        pending = None
        if kv_cache is not None:
            kv_cache.begin(s)
        for i, layer in self.layers.items():
            cache = kv_cache.layers[int(i)] if kv_cache is not None else None
            x, pending = layer(x, cos, sin, doc_ids, pending, cache)
        if kv_cache is not None:
            kv_cache.advance(s)
        if not self.post_process:
            return x if pending is None else x + pending
        if kv_cache is not None:
            x, pending = x[-1:], None if pending is None else pending[-1:]
        x, _ = add_norm(self.final_norm, pending, x)
        g = self.ps.tp_group
        if self.scores:
            v = F.linear(x, self.score.to(x.dtype)).squeeze(-1)  # [s(/tp), b]
            return (gather_from_sequence_replicated(v, g) if self.ps.sp else v).t().float()
        if labels is not None and self.cfg.loss_impl == "torch" and self.ps.tp > 1 and self.ps.tp_comm_overlap:
            loss = overlapped_vocab_parallel_loss(x, self.head_weight(), labels.t(), vocab_start=self.vocab_start,
                                                  vocab_size=self.cfg.vocab_size, ps=self.ps)
            return loss.t()
        x = gather_from_sequence(x, g) if self.ps.sp else copy_to_tp(x, g)
        if labels is not None:
            loss = self.loss(x, self.head_weight(), labels.t(), vocab_start=self.vocab_start,
                             vocab_size=self.cfg.vocab_size, group=g)
            return loss.t()
        return F.linear(x, self.head_weight()).transpose(0, 1)

    def full_logits(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """Logits over the real vocabulary, gathered over TP (for generation and tests)."""
        local = self.forward(tokens, **kw)
        return gather_from_tp(local, self.ps.tp_group)[..., : self.cfg.vocab_size]
