"""Typed run configuration: dataclasses loaded from YAML, with `section.key=value` overrides.

Every field has a default so a YAML file only states what differs. Unknown keys and ill-typed
values raise `ConfigError` (one line, naming the key and file) so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it as one line, without a traceback."""


class RunError(RuntimeError):
    """A run failed for a reason outside megalite's code (e.g. a checkpoint could not be written);
    the CLI prints it as one line, without a traceback, and exits with 1."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000  # 0: take the tokenizer's
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: multi-head attention (kv heads = heads)
    ffn_hidden_size: int | None = None  # None: Llama's rule, 8/3 * hidden rounded up to ffn_multiple_of
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | llama3
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qk_norm: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    attention_backend: str = "auto"  # auto | flash | sdpa
    # Layer-spec switches: which implementation each op uses (see megalite/model/spec.py).
    norm_impl: str = "torch"  # torch | triton | te
    mlp_impl: str = "torch"  # torch | triton | te
    linear_impl: str = "torch"  # torch | te
    loss_impl: str = "torch"  # torch | triton | fused_linear
    # lm: next-token logits / losses; score: one scalar per position (reward model, PPO critic).
    output_head: str = "lm"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        hidden = int(2 * (4 * self.hidden_size) / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B when > 1)
    sp: bool = False  # sequence parallelism inside the TP group
    # Column-parallel backward launches its input-grad all-reduce / reduce-scatter asynchronously
    # and computes the weight grad meanwhile; False: the blocking mappings (same numbers).
    tp_comm_overlap: bool = True
    cp: int = 1  # context parallelism; only 1 is supported for now
    pipeline_schedule: str = "1f1b"  # afab | 1f1b | interleaved (1f1b with vpp > 1 runs interleaved)
    pp_layer_split: list[int] | None = None  # layers per stage (per virtual stage with vpp); None: even
    distributed_optimizer: bool = False  # ZeRO-1: shard fp32 master weights and Adam state over DP
    bucket_size_mb: float = 25.0
    overlap_grad_reduce: bool = True
    recompute: str = "none"  # none | selective | full
    recompute_every: int = 1  # with `full`: recompute every k-th layer


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | wsd | linear | constant
    wsd_decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly to min_lr
    clip_grad: float = 1.0  # 0 disables clipping


@dataclass
class DataConfig:
    # A shard prefix (P_text_document), a list of them, or a blend {prefix: weight}. Empty: the
    # embedded default corpus (the Python standard library), built into `cache_dir` on first use.
    path: Any = ""
    tokenizer_type: str = "byte"  # byte | sentencepiece | hf | tiktoken
    tokenizer_model: str = ""
    split: str = "969,30,1"  # train, valid, test weights, split by document
    cache_dir: str = ".cache/megalite"
    reset_at_eod: bool = True  # document masking: positions restart and attention stops at EOD
    eod_mask_loss: bool = False
    curriculum: list[Any] | None = None  # [{step: N, blend: {prefix: weight}}, ...]
    # Post-training data (chat / preference shards written by tools/preprocess_data.py --mode ...).
    loss_on: str = "all"  # all | last: the assistant turns whose tokens carry the SFT loss
    packing: bool = True  # SFT: best-fit pack samples into seq_len rows (else one sample per row, padded)
    overlong: str = "truncate"  # truncate | drop: a sample longer than seq_len
    skip_bad_records: bool = False  # count and skip a sample whose loss mask is empty, instead of an error


@dataclass
class CheckpointConfig:
    save_interval: int = 0  # 0: only at the end and on SIGTERM
    dir: str = ""  # default: <run_dir>/checkpoints
    load: str = "auto"  # auto: resume from <dir>/latest when present; a path; or "" for a fresh start
    keep_last: int = 3
    keep_pow2: bool = True  # additionally keep every 2^n-th step
    async_save: bool = False
    save_on_exit: bool = True  # at the end of training (a preemption or exit_interval stop always saves)
    # Initialize from another run's (or an HF import's) weights: weights only, fresh optimizer,
    # step 0. Used only when this run's own `dir` has no `latest`, so a relaunch resumes instead.
    pretrained: str = ""


@dataclass
class TrainConfig:
    seq_len: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_steps: int = 1000
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 | fp8
    fp8_recipe: str = "delayed"  # te: delayed | current | mxfp8; torchao: tensorwise | rowwise
    fp8_backend: str = "te"  # te (Transformer Engine modules) | torchao (Float8Linear on our TP layers)
    compile: bool = False  # torch.compile each decoder layer (regional compilation)
    loss_scale: float = 0.0  # fp16: 0 means dynamic loss scaling
    device: str = "auto"  # auto | cpu | cuda
    run_dir: str = "runs/default"
    log_interval: int = 1
    eval_interval: int = 0  # 0 disables periodic eval
    eval_steps: int = 4
    exit_interval: int = 0  # > 0: checkpoint and exit cleanly once step % exit_interval == 0
    progress_bar: bool = True


@dataclass
class LoraConfig:
    rank: int = 0  # 0: LoRA off (full fine-tuning)
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "o", "gate_up", "down"])


@dataclass
class GenerateConfig:
    prompts: str = ""  # a text file (one prompt per line) or JSONL ({"prompt": ...} or {"messages": [...]})
    output: str = ""  # JSONL completions; default: <run_dir>/generations.jsonl
    chat: bool = False  # wrap text prompts in the chat template
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8


@dataclass
class RMConfig:
    margin: float = 0.0  # Bradley-Terry: the chosen score must win by this much (0: plain BT)


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | simpo
    label_smoothing: float = 0.0  # cDPO / SimPO: the probability that a label is flipped
    gamma: float = 0.0  # SimPO's target margin
    rpo_alpha: float = 0.0  # weight of the chosen answer's length-normalized NLL (RPO); 0: off
    reference: str = "precompute"  # precompute (one pass before training, stored beside the data) | model
    ref_checkpoint: str = ""  # the frozen reference's weights; empty: checkpoint.pretrained
    offload_reference: bool = False  # reference=model: park it on the CPU while the policy trains


@dataclass
class RLConfig:
    """`megalite grpo` / `megalite ppo` (docs/rl.md). train.global_batch_size counts responses per step."""
    prompts: str = ""  # JSONL ({"prompt"} / {"messages"} / {"tokens": [ids]}) or text, one prompt a line
    chat: bool = False  # wrap text prompts in the chat template
    group_size: int = 4  # responses per prompt (GRPO; PPO uses 1)
    max_new_tokens: int = 32
    temperature: float = 1.0  # > 0; the log-prob passes divide the logits by it too
    top_p: float = 1.0
    seed: int = 0  # sampling seed; each DP rank and step draws its own stream from it
    pad_id: int = -1  # -1: the tokenizer's pad (never the same as eos)
    eos_id: int = -1  # -1: the tokenizer's eos
    no_eos_penalty: float = 0.0  # subtracted from the score of a response that never emitted eos
    kl_coef: float = 0.05  # PPO: per-token KL penalty in the reward; GRPO: beta of the k3 loss term
    kl_estimator: str = "k1"  # PPO's in-reward estimator: k1 | k2 | k3 (GRPO's loss term is k3)
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO clip-higher: e.g. 0.28
    value_clip: float = 0.2  # PPO; 0: no value clipping
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # PPO: whiten over the real tokens of the step
    reward_norm: bool = False  # PPO: divide scores by a running std (merged over DP)
    ppo_epochs: int = 1  # PPO: critic epochs per rollout (the policy takes one step per rollout)
    aggregation: str = "seq_mean_token_mean"  # token_mean (DAPO) | seq_mean_token_mean | seq_mean_token_sum_norm
    scale_by_std: bool = True  # GRPO: divide group advantages by the group std (false: Dr. GRPO)
    drop_uniform_groups: bool = False  # DAPO: groups whose rewards are all equal carry no loss
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens of max_new_tokens; 0: off
    overlong_penalty: float = 1.0
    mismatch_bound: float = 1.01  # warn once when logprob_mismatch exceeds it
    offload_ref: bool = False  # keep the reference (and reward) model on CPU between phases


@dataclass
class RewardConfig:
    function: str = ""  # module:callable, called as fn(prompt: str, response: str) -> number
    model: str = ""  # a reward model checkpoint (model.output_head=score)


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # TensorBoard event files (needs the tensorboard package)
    tensorboard_dir: str = ""  # default: <run_dir>/tensorboard
    wandb_project: str = ""  # set: log to Weights & Biases (needs the wandb package)
    wandb_entity: str = ""
    wandb_name: str = ""  # default: <run dir name>-<stage>
    wandb_mode: str = ""  # online | offline | disabled; empty: wandb's default (WANDB_MODE)


@dataclass
class EvalConfig:
    path: Any = ""  # shard prefix(es) to score whole; empty: the data section's held-out split
    split: str = "valid"  # valid | test: which held-out split of data.path when eval.path is empty
    jsonl: str = ""  # a JSONL file of texts to score instead of shards
    text_key: str = "text"
    max_samples: int = 0  # 0: every window (shards) or every text (JSONL)
    output: str = ""  # the JSON result; default: <run_dir>/eval.json


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks `value` against the annotation `tp`, converting the YAML-natural cases (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}' in {source}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' in {source} must be a mapping")
            _apply(current, value, f"{path}.", source)
        else:
            setattr(obj, key, _coerce(value, hints[key], f"'{path}' in {source}"))


def section_from_dict(cls: type[_T], data: dict[str, Any], prefix: str, source: str) -> _T:
    """A config section (e.g. ModelConfig) from a mapping such as a checkpoint's saved config: keys
    it does not know are ignored, every value is checked against its annotation as in a YAML file
    (ConfigError naming `<prefix><key>` and `source` otherwise)."""
    names = {f.name for f in dataclasses.fields(cls)}
    obj = cls()
    _apply(obj, {k: v for k, v in data.items() if k in names}, prefix, source)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"cannot parse YAML in {p}{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        _apply(cfg, data, "", str(p))
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "", "command-line overrides")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Ranges: every numeric field is checked once at load, so a bad value is one line naming its key
# instead of a ZeroDivisionError (or a silently odd run) later. A field added without a rule here
# is only type-checked.

_POS, _NONNEG, _FRAC, _PROB = "> 0", ">= 0", "in [0, 1]", "in [0, 1)"
_RANGES: dict[str, dict[str, str]] = {
    "model": {"vocab_size": _NONNEG, "hidden_size": _POS, "num_layers": _POS, "num_heads": _POS,
              "num_kv_heads": _POS, "ffn_hidden_size": _POS, "ffn_multiple_of": _POS, "norm_eps": _POS,
              "rope_theta": _POS, "rope_scaling_factor": _POS, "rope_low_freq_factor": _POS,
              "rope_high_freq_factor": _POS, "rope_original_max_positions": _POS, "max_seq_len": _POS,
              "attention_dropout": _PROB, "hidden_dropout": _PROB, "init_std": _POS,
              "make_vocab_size_divisible_by": _POS},
    "parallel": {"tp": _POS, "pp": _POS, "vpp": _POS, "cp": _POS, "bucket_size_mb": _POS,
                 "recompute_every": _POS},
    "optim": {"lr": _POS, "min_lr": _NONNEG, "weight_decay": _NONNEG, "beta1": _PROB, "beta2": _PROB,
              "eps": _POS, "warmup_steps": _NONNEG, "wsd_decay_fraction": _FRAC, "clip_grad": _NONNEG},
    "train": {"seq_len": _POS, "micro_batch_size": _POS, "global_batch_size": _POS, "train_steps": _NONNEG,
              "seed": _NONNEG, "loss_scale": _NONNEG, "log_interval": _POS, "eval_interval": _NONNEG,
              "eval_steps": _POS, "exit_interval": _NONNEG},
    "checkpoint": {"save_interval": _NONNEG, "keep_last": _NONNEG},
    "lora": {"rank": _NONNEG, "alpha": _POS, "dropout": _PROB},
    "generate": {"max_new_tokens": _NONNEG, "temperature": _NONNEG, "top_k": _NONNEG, "top_p": _POS,
                 "seed": _NONNEG, "batch_size": _POS},
    "rm": {"margin": _NONNEG},
    "dpo": {"beta": _POS, "label_smoothing": _PROB, "gamma": _NONNEG, "rpo_alpha": _NONNEG},
    "rl": {"group_size": _POS, "max_new_tokens": _POS, "temperature": _POS, "top_p": _POS, "seed": _NONNEG,
           "kl_coef": _NONNEG, "clip_low": _PROB, "clip_high": _NONNEG, "value_clip": _NONNEG,
           "gamma": _FRAC, "lam": _FRAC, "ppo_epochs": _POS, "overlong_buffer": _NONNEG,
           "overlong_penalty": _NONNEG, "mismatch_bound": _POS},
    "eval": {"max_samples": _NONNEG},
}


def _in_range(v: float, rule: str) -> bool:
    if rule == _POS:
        return v > 0
    if rule == _NONNEG:
        return v >= 0
    return 0 <= v <= 1 if rule == _FRAC else 0 <= v < 1


def validate(cfg: Config) -> None:
    """Raises ConfigError naming the first field out of its range (or two fields that disagree)."""
    import math

    for section, rules in _RANGES.items():
        obj = getattr(cfg, section, None)
        for key, rule in rules.items():
            v = getattr(obj, key, None)
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # optional (None) or a field another version of the config does not have
            if not math.isfinite(v) or not _in_range(v, rule):
                raise ConfigError(f"{section}.{key} must be {rule}, got {v!r}")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr {cfg.optim.min_lr!r} is larger than optim.lr {cfg.optim.lr!r}")
    if cfg.generate.top_p > 1:
        raise ConfigError(f"generate.top_p must be in (0, 1], got {cfg.generate.top_p!r}")
