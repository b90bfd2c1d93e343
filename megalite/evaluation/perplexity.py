"""`megalite eval --config F checkpoint.load=DIR [eval.path=P | eval.jsonl=FILE]`: held-out perplexity.

What is scored:
  * shards: every window of the data section's held-out split (`eval.split`, valid or test, of
    `data.path`; the embedded corpus when empty), or all of `eval.path`'s documents; windows are
    built exactly as pretraining builds them (document masking included);
  * JSONL: each record's `eval.text_key` text, scored as texts.py says; the result also lists each
    text's log-likelihood and token count, and the bits per byte.

The model section comes from the checkpoint; the run config gives the layout (`parallel.*`, any
TP/PP/VPP/SP under torchrun, DP what remains), micro-batch and global batch sizes, precision and
tokenizer. The forward pass is the trainer's: the stage's forward and loss driven by the same
forward-only schedules (pipeline ones included), the sums reduced over DP and sent from the last
pipeline stage. Rank 0 prints one line and writes the JSON result atomically (`eval.output`,
default <run_dir>/eval.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megalite.atomic import atomic_write_text
from megalite.config import Config, ConfigError
from megalite.data import build_pretrain_datasets
from megalite.data.tokenizer import build_tokenizer
from megalite.evaluation.texts import scored_windows
from megalite.generation.loading import SPEC_FIELDS, load_weights, read_checkpoint
from megalite.parallel.comm import all_reduce, broadcast
from megalite.parallel.cross_entropy import IGNORE_INDEX
from megalite.parallel.pipeline.step import TokenLoss
from megalite.parallel.rng import seed_everything
from megalite.parallel.state import build_parallel_state, check_layout, init_distributed, resolve_device
from megalite.training.batch import make_micro_batch
from megalite.training.build import build_model, check_step_schedule
from megalite.training.forward_backward import get_forward_backward
from megalite.training.precision import make_autocast, resolve_precision


class EvalStage(TokenLoss):  # drives the schedules only: no data side, no optimizer
    """Token cross-entropy, plus each row's log-likelihood kept on the last stage (JSONL texts)."""

    def __init__(self) -> None:
        self.row_nll: dict[int, float] = {}

    def loss(self, output: torch.Tensor, mb: dict):
        per_token = output * (mb["labels"] != IGNORE_INDEX)
        for row, nll in zip(mb["row_ids"], per_token.double().sum(dim=1).tolist()):
            if row >= 0:
                self.row_nll[row] = self.row_nll.get(row, 0.0) + nll
        return per_token.sum(), {}


def _checkpoint_path(cfg: Config) -> Path:
    load = cfg.checkpoint.load
    if not load:
        raise ConfigError("eval needs a checkpoint: set checkpoint.load=DIR")
    return Path(cfg.checkpoint.dir or Path(cfg.train.run_dir) / "checkpoints") if load == "auto" else Path(load)


def _jsonl_rows(path: str, key: str, tokenizer, seq_len: int, limit: int) -> tuple[list, list[int], list[int]]:
    """Rows (tokens, labels, text index) of every text's windows; each text's token and byte counts."""
    rows, counts, nbytes = [], [], []
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"eval.jsonl: file not found: {p}")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{p}:{n}: not valid JSON") from None
            text = rec.get(key) if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text:
                raise ConfigError(f"{p}:{n}: no non-empty string under eval.text_key '{key}'")
            ids = tokenizer.encode(text)
            if not ids:
                raise ConfigError(f"{p}:{n}: the text encodes to no tokens")
            index = len(counts)
            for inputs, targets in scored_windows(ids, tokenizer.eod, seq_len):
                pad = seq_len - len(inputs)
                rows.append((inputs + [tokenizer.eod] * pad, targets + [IGNORE_INDEX] * pad, index))
            counts.append(len(ids))
            nbytes.append(len(text.encode("utf-8")))
            if limit and len(counts) == limit:
                break
    if not counts:
        raise ConfigError(f"{p}: no texts")
    return rows, counts, nbytes


def _shard_windows(cfg: Config, tokenizer) -> tuple[object, str]:
    data = cfg.data
    if cfg.eval.split not in ("valid", "test"):
        raise ConfigError(f"eval.split must be valid or test, got '{cfg.eval.split}'")
    if cfg.eval.path:  # every document of the given shards
        data = dataclasses.replace(data, path=cfg.eval.path, split="0,1,0" if cfg.eval.split == "valid" else "0,0,1",
                                   curriculum=None)
    _, valid, test = build_pretrain_datasets(data, cfg.train.seq_len, cfg.train.seed, tokenizer)
    ds = valid if cfg.eval.split == "valid" else test
    where = cfg.eval.path or data.path or "the embedded corpus"
    if ds is None:
        raise ConfigError(f"{where}: the {cfg.eval.split} split has no window of train.seq_len "
                          f"{cfg.train.seq_len} tokens (set eval.path, data.split or a shorter seq_len)")
    return ds, f"{where} ({cfg.eval.split} split)" if not cfg.eval.path else str(where)


def run_eval(cfg: Config) -> dict | None:
    """Scores the texts or windows; returns the result on rank 0 (None elsewhere). Every rank calls it."""
    e, t = cfg.eval, cfg.train
    step_dir, meta, model_cfg = read_checkpoint(_checkpoint_path(cfg))
    for f in SPEC_FIELDS:
        setattr(model_cfg, f, getattr(cfg.model, f))
    cfg = dataclasses.replace(cfg, model=model_cfg)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_layout(model_cfg, cfg.parallel, t, world)
    num_micro = check_step_schedule(cfg, dp)
    device = resolve_device(t.device)
    precision = resolve_precision(t, device, model_cfg)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the checkpoint's "
                          f"model.vocab_size {model_cfg.vocab_size}; check data.tokenizer_type/tokenizer_model")
    if e.jsonl:
        rows, counts, nbytes = _jsonl_rows(e.jsonl, e.text_key, tokenizer, t.seq_len, e.max_samples)
        source, total = e.jsonl, len(rows)
    else:
        windows, source = _shard_windows(cfg, tokenizer)
        total = min(len(windows), e.max_samples) if e.max_samples else len(windows)

    init_distributed(device)
    ps = build_parallel_state(cfg.parallel, device)
    chunks = build_model(cfg, ps, seed_everything(t.seed, ps.tp_rank, ps.pp_rank, device), schedule_checked=True)
    for c in chunks:  # every chunk's slice of the saved weights, resharded to this layout
        load_weights(c, step_dir, meta, ps)
        c.eval()
    autocast = make_autocast(precision, device, t.fp8_recipe, ps.tp_dp_group)
    forward = get_forward_backward(ps, cfg.parallel)
    stage = EvalStage()
    mbs, gbs = t.micro_batch_size, t.global_batch_size

    def micro_batch(lo: int) -> dict:
        """Rows lo..lo+mbs (padding rows past the end carry no loss)."""
        if e.jsonl:
            picked = [rows[i] if i < total else ([tokenizer.eod] * t.seq_len, [IGNORE_INDEX] * t.seq_len, -1)
                      for i in range(lo, lo + mbs)]
            tokens = torch.tensor([r[0] for r in picked])
            labels = torch.tensor([r[1] for r in picked])
            mb = {"tokens": tokens.to(device), "labels": labels.to(device), "position_ids": None, "doc_ids": None,
                  "num_loss_tokens": int((labels != IGNORE_INDEX).sum())}
            mb["row_ids"] = [r[2] for r in picked]
            return mb
        idx = np.arange(lo, lo + mbs)
        win = torch.from_numpy(np.stack([windows[int(min(i, total - 1))] for i in idx]).astype(np.int64))
        mb = make_micro_batch(win, tokenizer.eod, cfg.data.reset_at_eod, cfg.data.eod_mask_loss, device)
        if idx[-1] >= total:
            keep = torch.tensor(idx < total, device=mb["labels"].device).unsqueeze(1)
            mb["labels"] = torch.where(keep, mb["labels"], IGNORE_INDEX)
            mb["num_loss_tokens"] = int((mb["labels"] != IGNORE_INDEX).sum())
        mb["row_ids"] = [-1] * mbs
        return mb

    start = time.time()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    token_sum = 0.0
    with torch.no_grad():
        for base in range(0, total, gbs):
            batches = [micro_batch(base + (i * ps.dp + ps.dp_rank) * mbs) for i in range(num_micro)]
            n = torch.tensor(float(sum(mb["num_loss_tokens"] for mb in batches)), dtype=torch.float64, device=device)
            all_reduce(n, ps.dp_group)
            with autocast():
                sums = forward(chunks, batches, ps, num_units=float(n), step=stage, forward_only=True)
            s = sums["loss"].double()
            all_reduce(s, ps.dp_group)
            broadcast(s, src=ps.pp_ranks[-1], group=ps.pp_group)  # the loss lives on the last stage
            loss_sum += s
            token_sum += float(n)
    row_nll = stage.row_nll
    if ps.world_size > 1 and e.jsonl:
        parts: list = [None] * ps.world_size
        dist.all_gather_object(parts, row_nll if ps.tp_rank == 0 and ps.is_last_stage else {})
        row_nll = {}
        for part in parts:  # a long text's windows may be spread over DP ranks: add them up
            for k, v in part.items():
                row_nll[k] = row_nll.get(k, 0.0) + v
    if ps.rank != 0:
        return None
    loss = float(loss_sum) / token_sum
    result = {"checkpoint": str(step_dir), "step": meta.get("step"), "source": source, "layout": ps.describe(),
              "tokens": int(token_sum), "loss": loss, "ppl": math.exp(min(loss, 50.0))}
    if e.jsonl:
        per_text = [-row_nll.get(i, 0.0) for i in range(len(counts))]
        result["bits_per_byte"] = -sum(per_text) / math.log(2) / sum(nbytes)
        result["texts"] = [{"index": i, "tokens": c, "loglikelihood": ll} for i, (c, ll) in
                           enumerate(zip(counts, per_text))]
    else:
        result["windows"] = total
    out = Path(e.output or Path(t.run_dir) / "eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    bpb = f", {result['bits_per_byte']:.4f} bits/byte" if e.jsonl else ""
    print(f"megalite eval | {ps.describe()} | {source}: {int(token_sum)} tokens, loss {loss:.4f}, "
          f"ppl {result['ppl']:.3f}{bpb} in {time.time() - start:.1f}s | wrote {out}", flush=True)
    return result
