"""A megalite checkpoint as an lm-evaluation-harness model (`--model megalite`).

    python -m megalite.evaluation.lm_eval_main --model megalite \\
        --model_args checkpoint=runs/tiny/checkpoints --tasks hellaswag

lm-eval 0.4 finds models only through its registry, which it fills from its own package; it has no
plugin entry points, so this module must be imported before lm-eval looks the name up. The
`lm_eval_main` wrapper does that and then runs lm-eval's own command line; from Python,
`import megalite.evaluation.lm_eval_adapter` before `lm_eval.simple_evaluate(model="megalite", ...)`.

model_args: checkpoint (a step dir or checkpoint root, any layout), tokenizer_type and
tokenizer_model (default: the checkpoint's run config), device (default cuda if available),
dtype (fp32 | bf16; default bf16 on GPU), batch_size (default 8), max_length (default the model's
max_seq_len). The model runs at world size 1 (megalite.load_model).

Scoring matches `megalite eval` (texts.py): a text follows one end-of-document token; a context
and continuation are encoded separately and joined, the continuation's tokens scored.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import megalite
from megalite.config import ConfigError
from megalite.data.tokenizer import build_tokenizer
from megalite.evaluation.texts import scored_windows
from megalite.generation.loading import read_checkpoint


@register_model("megalite")
class MegaliteLM(LM):
    def __init__(self, checkpoint: str, tokenizer_type: str | None = None, tokenizer_model: str | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, **_: object) -> None:
        super().__init__()
        _, meta, model_cfg = read_checkpoint(checkpoint)
        data = (meta.get("config") or {}).get("data") or {}
        self.tokenizer = build_tokenizer(tokenizer_type or data.get("tokenizer_type", "byte"),
                                         tokenizer_model if tokenizer_model is not None
                                         else data.get("tokenizer_model", ""))
        if self.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer's vocabulary ({self.tokenizer.vocab_size}) is larger than the "
                              f"checkpoint's model.vocab_size {model_cfg.vocab_size}")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda by default; like its HF model, run where we can.
            print(f"megalite lm-eval model: device {device} is not available, using cpu", file=sys.stderr)
            device = "cpu"
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        want = dtype or ("bf16" if dev.type == "cuda" else "fp32")
        if want not in ("fp32", "bf16", "float32", "bfloat16"):
            raise ConfigError(f"megalite lm-eval model: dtype must be fp32 or bf16, got {want}")
        self.model = megalite.load_model(Path(checkpoint), device=dev,
                                         dtype=torch.bfloat16 if want in ("bf16", "bfloat16") else torch.float32)
        self.device_ = dev
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not supported
        self.max_length = int(max_length) if max_length else model_cfg.max_seq_len
        self.eod = self.tokenizer.eod

    # -- scoring ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(target), all targets greedy) of each (inputs, targets) pair; the targets are
        the inputs' last len(targets) next tokens."""
        out: list[tuple[float, bool]] = []
        for lo in range(0, len(pairs), self.batch_size):
            chunk = pairs[lo: lo + self.batch_size]
            width = max(len(i) for i, _ in chunk)
            ids = torch.full((len(chunk), width), self.eod, dtype=torch.long)
            for r, (inputs, _) in enumerate(chunk):
                ids[r, : len(inputs)] = torch.tensor(inputs)  # right padding: causal attention ignores it
            logp = F.log_softmax(self.model.full_logits(ids.to(self.device_)).double(), dim=-1)
            for r, (inputs, targets) in enumerate(chunk):
                lp = logp[r, len(inputs) - len(targets): len(inputs)]
                tgt = torch.tensor(targets, device=lp.device)
                out.append((float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())))
        return out

    def _context_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        ctx = [self.eod, *self.tokenizer.encode(context)]
        cont = self.tokenizer.encode(continuation)
        if not cont:
            raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
        full = (ctx + cont)[-(self.max_length + 1):]  # keep the continuation, cut the context's start
        return full[:-1], cont[-len(full) + 1:] if len(cont) >= len(full) else cont

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._context_pair(*r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for r in requests:
            windows = list(scored_windows(self.tokenizer.encode(r.args[0]), self.eod, self.max_length))
            out.append(sum(ll for ll, _ in self._score(windows)) if windows else 0.0)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1]) if len(r.args) > 1 else {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 1)  # room for one prompt token
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            prompt = [self.eod, *self.tokenizer.encode(context)][-(self.max_length - max_new):]
            gen = megalite.generate(self.model, [prompt], max_new, temperature=temperature,
                                    eos=sorted({self.tokenizer.eos, self.eod}))[0]
            tokens = [t for t in gen.tokens if t not in (self.tokenizer.eos, self.eod)]
            text = self.tokenizer.decode(tokens)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out
