"""`megalite generate --config F checkpoint.load=DIR generate.prompts=FILE`: completions as JSONL.

The model section comes from the checkpoint (its saved architecture); the run config supplies the
layer spec, the parallel layout, the tokenizer (`data.tokenizer_type/_model`), the device and
precision (`train.*`) and the `generate` section. Under torchrun every rank generates: the TP and PP
ranks of a replica together, the DP replicas each a share of the batches; rank 0 writes
`generate.output` (default `<run_dir>/generations.jsonl`) atomically, one line per prompt in order:
{"prompt", "completion", "tokens", "logprobs"}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megalite.atomic import atomic_write_text
from megalite.config import Config, ConfigError, TrainConfig
from megalite.data.tokenizer import build_tokenizer
from megalite.generation.generator import generate
from megalite.generation.loading import SPEC_FIELDS, build_inference_model, read_checkpoint
from megalite.generation.prompts import read_prompts, render_prompt
from megalite.parallel.pipeline import split_layers
from megalite.parallel.state import (
    build_parallel_state,
    check_layout,
    data_parallel_size,
    init_distributed,
    resolve_device,
)

# Generation runs in bf16 on GPUs (FP8 is a training recipe; its weights are bf16-castable).
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in _DTYPES:
        raise ConfigError(f"unknown train.precision '{precision}' (auto | fp32 | bf16 | fp16 | fp8)")
    return _DTYPES[precision]


def _checkpoint_path(cfg: Config) -> Path:
    load = cfg.checkpoint.load
    if not load:
        raise ConfigError("generate needs a checkpoint: set checkpoint.load=DIR")
    if load == "auto":
        return Path(cfg.checkpoint.dir or Path(cfg.train.run_dir) / "checkpoints")
    return Path(load)


def _stop_ids(tokenizer, chat: bool) -> list[int]:
    ids = {tokenizer.eos, tokenizer.eod}
    if chat:  # a chat turn ends with the template's end-of-turn marker
        ids |= {tokenizer.chat_tokens[t] for t in ("<|im_end|>", "<|eot_id|>") if t in tokenizer.chat_tokens}
    return sorted(ids)


def run_generate(cfg: Config) -> list[dict] | None:
    """Generates every prompt; returns the records on rank 0 (None elsewhere). Every rank calls it."""
    g = cfg.generate
    if not g.prompts:
        raise ConfigError("generate.prompts is required: a text file (one prompt per line) or JSONL")
    if g.batch_size < 1:
        raise ConfigError(f"generate.batch_size must be >= 1, got {g.batch_size}")
    if g.max_new_tokens < 1:
        raise ConfigError(f"generate.max_new_tokens must be >= 1, got {g.max_new_tokens}")
    # Everything cheap is checked before the process group, the weights and the first prompt.
    step_dir, meta, model_cfg = read_checkpoint(_checkpoint_path(cfg))
    for f in SPEC_FIELDS:
        setattr(model_cfg, f, getattr(cfg.model, f))
    par = dataclasses.replace(cfg.parallel, sp=False)  # decoding feeds one position: nothing to shard
    if par.vpp > 1:
        raise ConfigError("generate does not support parallel.vpp > 1 (interleaved pipeline); use vpp=1")
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    dp = data_parallel_size(par, world)
    check_layout(model_cfg, par, TrainConfig(seq_len=1, micro_batch_size=1, global_batch_size=dp), world)
    split_layers(model_cfg.num_layers, par.pp, par.vpp, par.pp_layer_split)  # the stages must fit
    device = resolve_device(cfg.train.device)
    dtype = _dtype(cfg.train.precision, device)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the checkpoint's "
                          f"model.vocab_size {model_cfg.vocab_size}; check data.tokenizer_type/tokenizer_model")
    records = read_prompts(g.prompts)
    prompts = [render_prompt(tokenizer, r, g.chat, cfg.data.tokenizer_model) for r in records]
    for r, p in zip(records, prompts):
        if len(p) + g.max_new_tokens > model_cfg.max_seq_len:
            raise ConfigError(f"{r['where']}: the prompt ({len(p)} tokens) plus generate.max_new_tokens "
                              f"({g.max_new_tokens}) exceeds model.max_seq_len {model_cfg.max_seq_len}")
    output = Path(g.output or Path(cfg.train.run_dir) / "generations.jsonl")

    init_distributed(device)
    ps = build_parallel_state(par, device)
    model = build_inference_model(model_cfg, step_dir, meta, ps, dtype, par)
    eos = _stop_ids(tokenizer, g.chat or any("messages" in r for r in records))
    start = time.time()
    mine: dict[int, list] = {}
    batches = range(0, len(prompts), g.batch_size)
    for k, lo in enumerate(batches):
        if k % ps.dp != ps.dp_rank:  # DP replicas split the batches; seeds follow the batch, not the rank
            continue
        gens = generate(model, prompts[lo: lo + g.batch_size], g.max_new_tokens, g.temperature, g.top_k,
                        g.top_p, seed=g.seed + k, eos=eos)
        for i, gen in enumerate(gens):
            mine[lo + i] = gen
    if ps.world_size > 1:
        parts: list = [None] * ps.world_size
        dist.all_gather_object(parts, mine if ps.tp_rank == 0 and ps.is_last_stage else {})
        for part in parts:
            mine.update(part)
    if ps.rank != 0:
        return None
    out = []
    for i, r in enumerate(records):
        tokens, logprobs = mine[i]
        text = tokens[:-1] if tokens and tokens[-1] in eos else tokens
        out.append({"prompt": r.get("prompt", r.get("messages")), "completion": tokenizer.decode(text),
                    "tokens": tokens, "logprobs": logprobs})
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    new = sum(len(o["tokens"]) for o in out)
    print(f"megalite generate | {ps.describe()} | {len(out)} prompts, {new} new tokens in "
          f"{time.time() - start:.1f}s | wrote {output}", flush=True)
    return out


def run(cfg: Config) -> None:
    """The `generate` stage of `megalite.cli`."""
    try:
        run_generate(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
