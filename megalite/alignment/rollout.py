"""The RL step's data work shared by `megalite grpo` and `megalite ppo` (docs/rl.md).

`RLStage.batches` runs, for this DP rank, everything before the policy update:

    prompts   this step's slice of `rl.prompts` (indexed by consumed samples, so resume works)
    rollout   G (GRPO) or 1 (PPO) answers per prompt from megalite.generate on the policy being
              trained, in-process under TP (no weight sync); the seed differs per DP rank and step
    score     `reward.function` on the decoded text, or a reward model read at the last real token
    logprobs  old log-probs (policy) and reference log-probs (frozen reference), logits / temperature,
              in eval mode, at the training micro-batch size
    advantages  the subclass's (`advantages()`): GRPO group-normalized, PPO GAE with a critic

and returns micro-batches whose `labels` mark the response tokens. Rows are prompt + response,
right-padded with the pad id (never eos); `mask` = labels != -100. The model passes run through the
layout's schedule forward-only, so TP, PP and DP work; their results (log-probs, values, scores)
land on the last pipeline stage, which alone computes the loss.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
import warnings
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from megalite.alignment.frozen import build_frozen_model
from megalite.config import Config, ConfigError
from megalite.generation import generate
from megalite.generation.prompts import read_prompts, render_prompt
from megalite.parallel.comm import all_reduce, broadcast
from megalite.parallel.cross_entropy import IGNORE_INDEX
from megalite.training.batch import batch_to_device
from megalite.training.stage import Stage

# ---------------------------------------------------------------------------------------------
# Prompts and rewards


def load_prompts(cfg: Config, tokenizer) -> list[list[int]]:
    """Token ids of every prompt in `rl.prompts`: JSONL records {"tokens": [ids]} as they are,
    {"prompt"} / {"messages"} through the chat template (`rl.chat` for text), or a text file."""
    path = Path(cfg.rl.prompts)
    if not cfg.rl.prompts:
        raise ConfigError("rl.prompts is not set (a JSONL or text file of prompts)")
    if path.suffix == ".jsonl" and path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        objs = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                objs.append((n, json.loads(line)))
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{n}: not valid JSON") from None
        if objs and isinstance(objs[0][1], dict) and "tokens" in objs[0][1]:
            out = []
            for n, obj in objs:
                ids = obj.get("tokens") if isinstance(obj, dict) else None
                if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                    raise ConfigError(f"{path}:{n}: \"tokens\" must be a non-empty list of token ids")
                out.append(ids)
            return out
    return [render_prompt(tokenizer, r, cfg.rl.chat, cfg.data.tokenizer_model) for r in read_prompts(path)]


def load_reward_function(spec: str) -> Callable[[str, str], Any]:
    if ":" not in spec:
        raise ConfigError(f"reward.function '{spec}' is not of the form module:callable")
    module, name = spec.split(":", 1)
    if os.getcwd() not in sys.path:  # a user's reward module beside the config, as `python -m` would find it
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.function '{spec}' cannot be imported ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"reward.function '{spec}' is not callable")
    return fn


def call_reward_function(fn: Callable, spec: str, prompts: list[str], responses: list[str],
                         prompt_index: list[int]) -> list[float]:
    """fn(prompt, response) for each answer; anything but a finite number is one line naming the
    function and the prompt's index in `rl.prompts`."""
    out = []
    for p, r, idx in zip(prompts, responses, prompt_index):
        try:
            v = fn(p, r)
        except Exception as e:  # noqa: BLE001 - user code: report it as one line
            msg = (str(e).splitlines() or [""])[0]
            raise ConfigError(f"reward.function {spec} raised {type(e).__name__}: {msg} (prompt {idx})") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ConfigError(f"reward.function {spec} returned {v!r} for prompt {idx}; a finite number is needed")
        out.append(float(v))
    return out


# ---------------------------------------------------------------------------------------------
# Model passes


class temperature_scale:
    """Divides the final hidden state (hence the logits and the per-token CE) by the sampling
    temperature while active, so recomputed log-probs are those the sampler drew from."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        self.model, self.scale, self.handle = model, 1.0 / temperature, None

    def __enter__(self):
        if self.scale != 1.0 and getattr(self.model, "post_process", False):
            s = self.scale

            def hook(_mod, _inp, out):
                return (out[0] * s, *out[1:]) if isinstance(out, tuple) else out * s

            self.handle = self.model.final_norm.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


def model_inputs(model: nn.Module, mb: dict, hidden: torch.Tensor | None = None, labels: bool = True) -> dict:
    """One chunk's inputs: tokens on the first pipeline stage, `hidden` after; labels on the last."""
    return dict(tokens=mb["tokens"] if model.pre_process else None, hidden=hidden,
                labels=mb["labels"] if labels and model.post_process else None,
                position_ids=mb.get("position_ids"), doc_ids=mb.get("doc_ids"))


class _Pass:
    """A forward-only pass step: the model's own forward, then `store(output, mb)` on the last stage."""

    metric_names: tuple[str, ...] = ()

    def __init__(self, store, labels: bool) -> None:
        self.store, self.labels = store, labels

    def forward(self, model: nn.Module, mb: dict, hidden):
        return model(**model_inputs(model, mb, hidden, self.labels))

    def loss(self, output: torch.Tensor, mb: dict):
        self.store(output.detach().float(), mb)
        return output.new_zeros(()), {}


@torch.no_grad()
def forward_pass(trainer, model: nn.Module, mbs: list[dict], store, labels: bool = True,
                 temperature: float = 1.0) -> None:
    """Runs `model` (this rank's chunk) over `mbs` through the layout's schedule, forward only, in
    eval mode (no dropout) and with the logits divided by `temperature`; on the last pipeline
    stage `store(output, mb)` gets each micro-batch's per-token CE (lm head with labels) or scores."""
    was = model.training
    model.eval()
    try:
        with temperature_scale(model, temperature), trainer.autocast():
            trainer.forward_backward([model], mbs, trainer.ps, num_units=1.0, step=_Pass(store, labels),
                                     forward_only=True)
    finally:
        model.train(was)


def frozen_copy(trainer, chunk: nn.Module) -> nn.Module:
    """A frozen twin of a policy chunk (same layout and weights), no grads, eval mode."""
    from megalite.training.build import build_model

    (twin,) = build_model(trainer.cfg, trainer.ps, None, schedule_checked=True)
    twin.load_state_dict(chunk.state_dict())
    return freeze(twin)


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class Offload:
    """Keeps a frozen model on CPU between its passes when enabled."""

    def __init__(self, model: nn.Module, device: torch.device, enabled: bool) -> None:
        self.model, self.device, self.enabled = model, device, enabled
        if enabled:
            model.to("cpu")

    def __enter__(self) -> nn.Module:
        if self.enabled:
            self.model.to(self.device)
        return self.model

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.model.to("cpu")


# ---------------------------------------------------------------------------------------------
# The stage


class RLStage(Stage):
    """Shared rollout -> score -> log-prob passes; subclasses give `group`, `advantages` and `loss`."""

    perplexity = False
    group = 1
    metric_names = ("kl", "clip_fraction", "tokens")

    def __init__(self) -> None:
        self.ready = False
        self.step_metrics: dict[str, float] = {}
        self.warned = False
        self.t_batches_done = 0.0

    # -- setup ------------------------------------------------------------------------------
    def build_datasets(self, trainer) -> tuple[Any, Any | None]:
        cfg, t, rl = trainer.cfg, trainer.cfg.train, trainer.cfg.rl
        if cfg.parallel.sp or cfg.parallel.vpp > 1:
            raise ConfigError(f"{self.name}: parallel.sp and parallel.vpp > 1 are not supported (the rollout's "
                              f"generator runs without them); TP, PP and DP are")
        local = t.global_batch_size // trainer.dp
        if local % self.group:
            raise ConfigError(f"{self.name}: train.global_batch_size {t.global_batch_size} / DP {trainer.dp} = {local} "
                              f"responses per rank is not a multiple of rl.group_size {self.group}")
        if bool(cfg.reward.function) == bool(cfg.reward.model):
            raise ConfigError(f"{self.name}: set exactly one of reward.function and reward.model")
        tok = trainer.tokenizer
        self.temperature = rl.temperature
        self.eos = rl.eos_id if rl.eos_id >= 0 else tok.eos
        self.pad = rl.pad_id if rl.pad_id >= 0 else tok.pad
        if self.pad == self.eos:
            raise ConfigError(f"rl.pad_id {self.pad} equals the eos id; pad and eos must differ")
        prompts = load_prompts(cfg, tok)
        longest = max(len(p) for p in prompts)
        if longest + rl.max_new_tokens > t.seq_len + 1:
            raise ConfigError(f"the longest prompt ({longest} tokens) + rl.max_new_tokens ({rl.max_new_tokens}) "
                              f"exceeds train.seq_len + 1 ({t.seq_len + 1})")
        self.reward_fn = load_reward_function(cfg.reward.function) if cfg.reward.function else None
        return prompts, None

    def setup(self, trainer) -> None:
        """Models built after the trainer's policy exists (first step)."""
        cfg = trainer.cfg
        (self.policy,) = trainer.chunks
        self.trainer = trainer
        if cfg.checkpoint.pretrained:
            (ref,) = build_frozen_model(cfg, trainer.ps, cfg.checkpoint.pretrained, "lm",
                                        what="checkpoint.pretrained (the reference)")
        elif trainer.state.step == 0:
            ref = frozen_copy(trainer, self.policy)  # the initial policy is the reference
        else:
            raise ConfigError(f"{self.name}: resuming needs checkpoint.pretrained (the reference model's weights)")
        self.ref = Offload(ref, trainer.device, cfg.rl.offload_ref)
        self.rm = None
        if cfg.reward.model:
            (rm,) = build_frozen_model(cfg, trainer.ps, cfg.reward.model, "score", what="reward.model")
            self.rm = Offload(rm, trainer.device, cfg.rl.offload_ref)
        self.ready = True

    # -- one step's data --------------------------------------------------------------------
    def batches(self, trainer, dataset: list[list[int]], consumed: int) -> list[dict]:
        if not self.ready:
            self.setup(trainer)
        rl, ps, t = trainer.cfg.rl, trainer.ps, trainer.cfg.train
        G = self.group
        local = t.global_batch_size // ps.dp
        n_prompts = local // G
        first = consumed // G + ps.dp_rank * n_prompts
        index = [(first + j) % len(dataset) for j in range(n_prompts)]
        t0 = time.time()
        prompts = [dataset[i] for i in index for _ in range(G)]
        seed = rl.seed * 1_000_003 + (consumed // t.global_batch_size) * 7919 + ps.dp_rank  # same over TP
        gens = generate(self.policy, prompts, rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
                        seed=seed, eos=self.eos)
        t1 = time.time()
        responses = [g.tokens for g in gens]
        has_eos = torch.tensor([bool(r) and r[-1] == self.eos for r in responses])
        rows = self.build_rows(prompts, gens, t.seq_len)
        mbs = [{k: v[i * t.micro_batch_size:(i + 1) * t.micro_batch_size] for k, v in rows.items()}
               for i in range(trainer.num_micro)]
        mbs = [batch_to_device(mb, trainer.device) for mb in mbs]
        scores = self.score(trainer, prompts, responses, [i for i in index for _ in range(G)], mbs)
        scores = scores - rl.no_eos_penalty * (~has_eos).double()
        t2 = time.time()
        # Log-probs land on the last pipeline stage, the only one that computes a loss.
        forward_pass(trainer, self.policy, mbs, lambda out, mb: mb.__setitem__("old_logps", -out),
                     temperature=rl.temperature)
        with self.ref as ref:
            forward_pass(trainer, ref, mbs, lambda out, mb: mb.__setitem__("ref_logps", -out),
                         temperature=rl.temperature)
        self.extra_passes(trainer, mbs)
        t3 = time.time()
        mism = torch.zeros(2, dtype=torch.float64)
        for mb in mbs if ps.is_last_stage else ():  # before advantages(): DAPO may drop rows from the loss
            m = mb["mask"]
            d = (mb["old_logps"] - mb["rollout_logps"]).abs().double()
            mism += torch.stack([torch.where(m, d.exp(), 0.0).sum().cpu(), m.sum().double().cpu()])
        lengths = torch.tensor([len(r) for r in responses], dtype=torch.float64)
        self.advantages(trainer, mbs, scores, lengths)
        for mb in mbs:
            mb["num_loss_tokens"] = int(mb["mask"].sum())
        t4 = time.time()
        self.update_critic(trainer, mbs)
        t5 = time.time()
        stats = torch.tensor([float(scores.sum()), float(len(responses)), float(lengths.sum()), *mism.tolist(),
                              t1 - t0, t2 - t1 + t4 - t3, t3 - t2, float(has_eos.sum()), t5 - t4,
                              float(sum(mb["num_units"] for mb in mbs))], dtype=torch.float64, device=trainer.device)
        all_reduce(stats, ps.dp_group)
        broadcast(stats, src=ps.pp_ranks[-1], group=ps.pp_group)  # every rank logs the last stage's figures
        s = stats.tolist()
        if s[10] == 0 and ps.dp_rank == 0:
            # Nothing carries loss this step (e.g. DAPO dropped every group): the loss sums are 0, and
            # one nominal unit keeps the trainer's normalization finite, so the grads are exactly 0.
            mbs[0]["num_units"] = 1
        dp = float(ps.dp)
        self.step_metrics = {"mean_reward": s[0] / s[1], "response_length": s[2] / s[1],
                             "logprob_mismatch": s[3] / max(s[4], 1.0), "eos_fraction": s[8] / s[1],
                             "time_rollout": s[5] / dp, "time_score_adv": s[6] / dp, "time_logprob": s[7] / dp,
                             "time_critic": s[9] / dp,
                             "rollout_tokens_per_sec": s[2] / max(s[5] / dp, 1e-9)}
        if self.step_metrics["logprob_mismatch"] > rl.mismatch_bound and not self.warned:
            self.warned = True
            if ps.rank == 0:
                warnings.warn(f"logprob_mismatch {self.step_metrics['logprob_mismatch']:.4f} exceeds "
                              f"rl.mismatch_bound {rl.mismatch_bound} (rollout vs training forward)", stacklevel=1)
        self.t_batches_done = time.time()
        return mbs

    def build_rows(self, prompts: list[list[int]], gens, seq_len: int) -> dict[str, torch.Tensor]:
        """Inputs, labels (response tokens only) and the generator's log-probs aligned to labels."""
        b = len(prompts)
        tokens = torch.full((b, seq_len), self.pad, dtype=torch.long)
        labels = torch.full((b, seq_len), IGNORE_INDEX, dtype=torch.long)
        rollout = torch.zeros(b, seq_len, dtype=torch.float32)
        last = torch.zeros(b, dtype=torch.long)  # index of the last real token of prompt + response
        for i, (p, g) in enumerate(zip(prompts, gens)):
            seq = list(p) + list(g.tokens)
            n = min(len(seq) - 1, seq_len)
            tokens[i, :n] = torch.tensor(seq[:n])
            lp, lr = len(p), len(g.tokens)
            if lr:
                labels[i, lp - 1: lp - 1 + lr] = torch.tensor(g.tokens)
                rollout[i, lp - 1: lp - 1 + lr] = torch.tensor(g.logprobs, dtype=torch.float32)
            last[i] = len(seq) - 1
        full = torch.cat([tokens, torch.full((b, 1), self.pad, dtype=torch.long)], 1)
        full[torch.arange(b), last] = torch.tensor([(list(p) + list(g.tokens))[-1] for p, g in zip(prompts, gens)])
        return {"tokens": tokens, "labels": labels, "mask": labels != IGNORE_INDEX, "rollout_logps": rollout,
                "full_tokens": full, "last_index": last}

    @torch.no_grad()
    def score(self, trainer, prompts, responses, prompt_index, mbs) -> torch.Tensor:
        if self.reward_fn is not None:
            tok = trainer.tokenizer
            texts = [tok.decode([t for t in r if t != self.eos]) for r in responses]
            vals = call_reward_function(self.reward_fn, trainer.cfg.reward.function,
                                        [tok.decode(p) for p in prompts], texts, prompt_index)
            return torch.tensor(vals, dtype=torch.float64)
        # Whole rows (prompt + answer, pads after: causal attention never sees them), read at the
        # last real token on the last pipeline stage, then sent to the pipeline's other stages.
        rows = [{"tokens": mb["full_tokens"], "labels": None, "last_index": mb["last_index"]} for mb in mbs]

        def store(out: torch.Tensor, mb: dict) -> None:
            mb["score"] = out.gather(1, mb["last_index"][:, None]).squeeze(1)

        with self.rm as rm:
            forward_pass(trainer, rm, rows, store, labels=False)
        b = sum(mb["tokens"].shape[0] for mb in mbs)
        ps = trainer.ps
        scores = torch.cat([r["score"] for r in rows]).double() if ps.is_last_stage else \
            torch.zeros(b, dtype=torch.float64, device=trainer.device)
        broadcast(scores, src=ps.pp_ranks[-1], group=ps.pp_group)
        return scores.cpu()

    # -- subclass hooks ---------------------------------------------------------------------
    def extra_passes(self, trainer, mbs: list[dict]) -> None:
        """More no-grad passes after the log-probs (PPO's values)."""

    @abstractmethod
    def advantages(self, trainer, mbs: list[dict], scores: torch.Tensor, lengths: torch.Tensor) -> None:
        """Writes each micro-batch's advantages (GRPO: group-normalized; PPO: GAE)."""

    def update_critic(self, trainer, mbs: list[dict]) -> None:
        """PPO trains its critic here, on the rollout just scored."""

    def set_units(self, mb: dict, aggregation: str) -> None:
        """The loss units of a micro-batch: real tokens (token_mean) or non-empty responses."""
        m = mb["mask"]
        mb["num_units"] = int(m.sum()) if aggregation == "token_mean" else int((m.sum(1) > 0).sum())

    # -- training ---------------------------------------------------------------------------
    def loss_units(self, mb: dict) -> float:
        return float(mb["num_units"])

    def forward(self, model: nn.Module, mb: dict, hidden):
        model.eval()  # dropout off in the update too, so it sees the distribution the rollout sampled
        with temperature_scale(model, self.temperature):
            return model(**model_inputs(model, mb, hidden))

    def reduce_metrics(self, sums: dict[str, float], num_units: float) -> dict[str, float]:
        tokens = max(sums["tokens"], 1.0)
        out = {"kl": sums["kl"] / tokens, "clip_fraction": sums["clip_fraction"] / tokens, **self.step_metrics}
        out["time_train"] = time.time() - self.t_batches_done
        tr = self.trainer
        step = tr.state.step + 1  # the trainer counts the step after this call
        if tr.is_logger and (step % tr.cfg.train.log_interval == 0 or step == tr.cfg.train.train_steps):
            print(f"  {self.name} step {step} | reward {out['mean_reward']:.4f} | length {out['response_length']:.1f} | "
                  f"kl {out['kl']:.4f} | clipped {out['clip_fraction']:.3f} | mismatch {out['logprob_mismatch']:.5f} | "
                  f"rollout {out['time_rollout']:.2f}s logprob {out['time_logprob']:.2f}s train {out['time_train']:.2f}s",
                  flush=True)
        return out
