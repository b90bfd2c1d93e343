"""Batched autoregressive generation on the training model: one prefill over the prompts, then one
token per step, each step's keys/values appended to a KV cache (megalite/model/kv_cache.py).

Prompts of different lengths are left-padded to the longest, so every row's next token goes into
the same cache slot. Positions count each row's real tokens only (the first prompt token is 0, as
when the prompt runs alone) and attention skips the padding slots. A row stops at an `eos` token
(kept, with its log-prob, as the last token) or after `max_new_tokens`; the batch stops when every
row has.

Under tensor parallelism every rank runs the same steps: each gathers the full logits over TP
(`model.full_logits`), samples from the same seeded generator, and the tokens of the first TP rank
are broadcast to the others, so the ranks feed the same tokens even if their logits differ in the
last bit. Under pipeline parallelism (one chunk per rank, no interleaving) each stage keeps the
cache of its own layers and passes the step's hidden states on; the last stage samples and
broadcasts the tokens to its pipeline, so every rank returns the same result. Sequence
parallelism is not supported here (a decode step has one position to shard).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from megalite.config import ConfigError
from megalite.generation.sampling import check_sampling, sample
from megalite.model.kv_cache import KVCache
from megalite.parallel.comm import broadcast
from megalite.parallel.pipeline.p2p import PipelineComm


class Generation(NamedTuple):
    """One prompt's new tokens (ending with the eos token when it stopped there) and their log-probs."""

    tokens: list[int]
    logprobs: list[float]


def check_model(model) -> None:
    ps = model.ps
    if ps.vpp > 1:
        raise ConfigError("generation with parallel.vpp > 1 (interleaved pipeline) is not supported; use vpp=1")
    if (model.pre_process, model.post_process) != (ps.is_first_stage, ps.is_last_stage):
        raise ConfigError(f"this model chunk (pre_process={model.pre_process}, post_process={model.post_process}) "
                          f"is not pipeline stage {ps.pp_rank} of {ps.pp}; generation needs the whole pipeline")
    if getattr(model, "scores", False):
        raise ConfigError("generation needs a language-model head; this model has model.output_head=score")
    if ps.sp:
        raise ConfigError("generation runs without sequence parallelism; build the model with parallel.sp=false")


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if isinstance(prompts, torch.Tensor) or (prompts and isinstance(prompts[0], int)):
        raise ConfigError("prompts must be a list of token-id lists (one list per prompt)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty (generation needs at least one token)")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ConfigError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def _eos_ids(eos: int | Iterable[int] | None) -> list[int]:
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos: int | Iterable[int] | None = None, *,
             use_cache: bool = True) -> list[Generation]:
    """New tokens and their log-probs for each prompt (token-id lists), in order; see the module doc.
    `use_cache=False` recomputes the whole sequence at every step (a reference and a benchmark
    baseline; same tokens). Sampling draws from one generator seeded with `seed` for the batch:
    the same call gives the same tokens; a prompt's sample depends on the rest of its batch.
    The model runs in eval mode (no dropout) and gets its own mode back, so a training loop can
    roll out from the model it trains."""
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, use_cache)
    finally:
        model.train(was_training)


@torch.no_grad()
def _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos, use_cache) -> list[Generation]:
    check_model(model)
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cfg, ps = model.cfg, model.ps
    _check_prompts(prompts, cfg.vocab_size)
    if not prompts or max_new_tokens == 0:
        return [Generation([], []) for _ in prompts]
    lengths = [len(p) for p in prompts]
    b, plen = len(prompts), max(lengths)
    total = plen + max_new_tokens
    if total > cfg.max_seq_len:
        raise ConfigError(f"the longest prompt ({plen} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                          f"model.max_seq_len {cfg.max_seq_len}")
    device = next(model.parameters()).device
    # Left-padded token buffer for prompts and answers; padding ids are 0 and never attended to.
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    valid = torch.ones(b, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p): plen] = torch.tensor([int(t) for t in p], dtype=torch.long)
        valid[i, : plen - len(p)] = False
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    padded = min(lengths) != plen
    # Without a cache, padding is masked as a separate "document" (the training mask code).
    doc_ids = valid.long() if padded else None
    eos_ids = torch.tensor(_eos_ids(eos), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    tp_src = ps.rank - ps.tp_rank  # global rank of TP rank 0 (TP ranks are adjacent)
    hidden_dtype = next(model.parameters()).dtype  # what crosses pipeline stages

    cache = KVCache(model.layer_ids, valid) if use_cache else None

    def next_logits(end: int, new: int) -> torch.Tensor | None:
        """Logits [b, V] after position end-1, feeding the last `new` positions (all with no cache);
        None on a pipeline stage other than the last, which sends its hidden states on instead."""
        sl = slice(end - new, end) if cache is not None else slice(0, end)
        kw = dict(position_ids=positions[:, sl], kv_cache=cache,
                  doc_ids=None if doc_ids is None or cache is not None else doc_ids[:, sl])
        ids = tokens[:, sl] if model.pre_process else None
        if ps.pp == 1:
            return model.full_logits(ids, **kw)[:, -1]
        comm = PipelineComm(ps, (sl.stop - sl.start, b, cfg.hidden_size), hidden_dtype, device)
        hidden = comm.recv_forward()
        if model.post_process:
            return model.full_logits(ids, hidden=hidden, **kw)[:, -1]
        comm.send_forward(model(ids, hidden=hidden, **kw).to(hidden_dtype))
        return None

    out_tokens = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
    out_logps = torch.zeros(b, max_new_tokens, dtype=torch.float64, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stop_at = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)  # tokens kept per row
    logits = next_logits(plen, plen)
    for step in range(max_new_tokens):
        picked = torch.zeros(2, b, dtype=torch.float64, device=device)  # token ids are exact in float64
        if logits is not None:
            tok, logp = sample(logits, temperature, top_k, top_p, generator)
            picked = torch.stack([tok.double(), logp.double()])
            broadcast(picked, tp_src, ps.tp_group)
        broadcast(picked, ps.pp_ranks[-1], ps.pp_group)  # from the last stage to the whole pipeline
        tok, logp = picked[0].long(), picked[1]
        out_tokens[:, step], out_logps[:, step] = tok, logp
        hit = torch.isin(tok, eos_ids) & ~done
        stop_at[hit] = step + 1
        done |= hit
        tokens[:, plen + step] = tok
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        logits = next_logits(plen + step + 1, 1)
    out_tokens, out_logps, stop_at = out_tokens.tolist(), out_logps.tolist(), stop_at.tolist()
    return [Generation(out_tokens[i][: stop_at[i]], out_logps[i][: stop_at[i]]) for i in range(b)]
