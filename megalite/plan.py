"""Capacity planning: parameters, FLOPs, Chinchilla, per-GPU memory and time of candidate layouts.

`tools/plan.py` prints what this module computes; the tests import it.

Memory per GPU (the most loaded pipeline stage), in bytes:
  weights     4 x params on the stage        (megalite keeps fp32 parameters; autocast runs bf16)
  grads       4 x params                     (the contiguous fp32 grad buffer)
  optimizer   8 x params, / dp with ZeRO-1   (Adam m and v; the fp32 parameters are the master copy)
  activations per layer x layers on the stage x micro-batches in flight, + the head's logits

Activations. Korthikanti et al. (2022) count, per layer and micro-batch, sbh(34 + 5as/h) bytes
without parallelism, sbh(10 + 24/t + 5as/(ht)) with TP, sbh(34/t + 5as/(ht)) with TP+SP, 34sbh/t
with selective recompute and 2sbh with full recompute (`korthikanti_layer_bytes`). Their 34 assumes
a GeLU MLP of width 4h, multi-head attention, 2-byte activations and 1-byte dropout masks. megalite
differs, so `layer_activation_elems` counts what its layer actually saves for backward, per token
(checked against torch's saved-tensor hooks):
  per norm      2h + 1  input, normalized output, fp32 1/rms              (two norms per layer)
  attention     h (qkv input) + h + 2kv*d (fused qkv output, v is a view of it) + h (q after RoPE)
                + kv*d (k after RoPE) + heads (softmax log-sum-exp) + h (out-projection input)
  SwiGLU MLP    h (gate_up input) + 2f (gate|up) + f (silu(gate)) + f (down input)
giving 9h + 4f + 3kv*d + heads + 2 elements. Flash/SDPA attention never stores the s x s scores, so
the 5as/h term is absent and selective recompute only drops the log-sum-exp. There is no dropout by
default (no masks). With TP the projections' inputs are full (2h: megalite keeps the all-gathered
input under SP, where Megatron re-gathers it in backward) and the norms are replicated without SP;
everything else is split over t. Full recompute keeps each layer's input (x and the pending MLP
output: 2h, /t with SP) plus one layer's activations while it is recomputed in backward.

In flight on the first pipeline stage: min(pp, m) micro-batches with 1F1B and, interleaved,
pp*vpp + pp - 1 model chunks (Korthikanti's factor 1 + (pp-1)/(pp*vpp)), capped at m*vpp.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from megalite.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megalite.model.flops import flops_per_token, param_count
from megalite.parallel.layers import padded_vocab_size
from megalite.parallel.pipeline.stages import check_schedule
from megalite.parallel.state import check_layout

# Hoffmann et al. (2022), approach 3: L(N, D) = E + A / N^alpha + B / D^beta.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TOKENS_PER_PARAM = 20.0

# GPU memory (GiB) and dense BF16 peak (TFLOP/s, the vendors' datasheets; as in training/metrics.py).
GPUS: dict[str, tuple[float, float]] = {
    "H200": (141.0, 989.4), "H100": (80.0, 989.4), "H100-PCIe": (80.0, 756.0),
    "A100-80GB": (80.0, 312.0), "A100-40GB": (40.0, 312.0), "L40S": (48.0, 362.1),
}
GIB = 2.0**30


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    sp: bool = False
    zero1: bool = False
    recompute: str = "none"  # none | selective | full

    def describe(self) -> str:
        return (f"tp{self.tp} pp{self.pp} vpp{self.vpp} dp{self.dp}{' sp' if self.sp else ''}"
                f"{' zero1' if self.zero1 else ''} recompute={self.recompute}")


@dataclass
class Memory:
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


# -- scaling laws ---------------------------------------------------------------------------------
def chinchilla_tokens(params: float) -> float:
    return TOKENS_PER_PARAM * params


def chinchilla_loss(params: float, tokens: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / params ** c["alpha"] + c["B"] / tokens ** c["beta"]


def training_flops(model: ModelConfig, seq_len: int, tokens: float) -> float:
    """Model FLOPs of training on `tokens` (6N per token plus attention, as MFU counts them)."""
    return flops_per_token(model, seq_len) * tokens


# -- activations ----------------------------------------------------------------------------------
def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                            recompute: str = "none") -> float:
    """Korthikanti et al.'s activation bytes of one GPT layer and micro-batch (16-bit activations)."""
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    attn = 0.0 if recompute == "selective" else 5 * a * s / (h * t)
    return sbh * ((34 / t if sp else 10 + 24 / t) + attn)


def layer_activation_elems(model: ModelConfig, t: int = 1, sp: bool = False, recompute: str = "none") -> float:
    """Elements one megalite layer saves for backward per token of a micro-batch (module doc)."""
    h, f, d, nh, kv = model.hidden_size, model.ffn_size, model.head_dim, model.num_heads, model.kv_heads
    kvd = kv * d / t if kv >= t else d  # fewer kv heads than ranks: each rank attends with one
    norms = 2 * (2 * h + 1) / (t if sp else 1)
    inputs = 2 * h  # qkv and gate_up inputs: full (all-gathered under SP)
    sharded = (3 * h + 4 * f + (0 if recompute == "selective" else nh)) / t + 3 * kvd
    return norms + inputs + sharded


def head_activation_elems(model: ModelConfig, t: int) -> float:
    """Per token on the last stage: final norm (2h+1), head input (h), the logits and their grad."""
    return 2 * model.hidden_size + 1 + model.hidden_size + 2 * padded_vocab_size(
        model.vocab_size, t, model.make_vocab_size_divisible_by) / t


def in_flight(pp: int, vpp: int, num_micro: int) -> float:
    """Micro-batches of a whole stage's activations held at once on the first pipeline stage."""
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp, num_micro))
    return min(pp * vpp + pp - 1, num_micro * vpp) / vpp


# -- memory ---------------------------------------------------------------------------------------
def stage_params(model: ModelConfig, lay: Layout) -> float:
    """Parameters on this GPU for the most loaded pipeline stage (layers, plus embedding or head)."""
    per_layer = (param_count(replace(model, num_layers=1, vocab_size=0)) - model.hidden_size) / lay.tp
    vocab = padded_vocab_size(model.vocab_size, lay.tp, model.make_vocab_size_divisible_by) * model.hidden_size / lay.tp
    layers = math.ceil(model.num_layers / lay.pp)
    if lay.pp == 1:
        return layers * per_layer + vocab * (1 if model.tie_embeddings else 2) + model.hidden_size
    return layers * per_layer + vocab + model.hidden_size  # first stage (embedding) or last (head + norm)


def memory(model: ModelConfig, lay: Layout, seq_len: int, micro_batch: int, num_micro: int,
           act_bytes: int = 2) -> Memory:
    """Per-GPU bytes of the most loaded stage; `act_bytes` 2 under bf16 autocast, 4 in fp32."""
    n = stage_params(model, lay)
    tokens = seq_len * micro_batch
    layers = math.ceil(model.num_layers / lay.pp)
    if lay.recompute == "full":
        kept = 2 * model.hidden_size / (lay.tp if lay.sp else 1)
        acts = tokens * act_bytes * (kept * layers * in_flight(lay.pp, lay.vpp, num_micro)
                                     + layer_activation_elems(model, lay.tp, lay.sp))
    else:
        per_layer = layer_activation_elems(model, lay.tp, lay.sp, lay.recompute)
        acts = tokens * act_bytes * per_layer * layers * in_flight(lay.pp, lay.vpp, num_micro)
    head = tokens * 4 * head_activation_elems(model, lay.tp)  # the loss runs in fp32
    if lay.pp == 1:
        acts += head
    else:  # the first stage holds more layers' activations, the last one the logits
        acts = max(acts, tokens * act_bytes * layer_activation_elems(model, lay.tp, lay.sp, lay.recompute)
                   * layers + head)
    return Memory(4.0 * n, 4.0 * n, 8.0 * n / (lay.dp if lay.zero1 else 1), acts)


# -- time -----------------------------------------------------------------------------------------
def step_overhead(model: ModelConfig, lay: Layout, seq_len: int, num_micro: int) -> float:
    """Multiplier on the ideal compute time: the pipeline bubble and recomputed forward FLOPs."""
    bubble = (lay.pp - 1) / (lay.vpp * num_micro)
    fpt = flops_per_token(model, seq_len)
    if lay.recompute == "full":
        extra = fpt / 3  # one more forward: 2 of the 6 FLOPs per parameter
    elif lay.recompute == "selective":
        extra = 4.0 * model.num_layers * model.hidden_size * seq_len  # the attention core's forward
    else:
        extra = 0.0
    return (1 + bubble) * (1 + extra / fpt)


@dataclass
class Candidate:
    layout: Layout
    memory: Memory
    seconds: float
    fits: bool


def candidates(model: ModelConfig, train: TrainConfig, gpus: int, gpu_mem_gib: float, peak_tflops: float,
               mfu: float, tokens: float, gpus_per_node: int = 8) -> list[Candidate]:
    """Every layout megalite accepts for this model and cluster, fastest first (ties: less memory)."""
    out = []
    ideal = training_flops(model, train.seq_len, tokens) / (gpus * peak_tflops * 1e12 * mfu)
    for tp, pp in itertools.product(_divisors(min(gpus, gpus_per_node)), _divisors(gpus)):
        if gpus % (tp * pp):
            continue
        dp = gpus // (tp * pp)
        for vpp in ([1] if pp == 1 else [v for v in (1, 2, 4, 5, 8) if model.num_layers % (pp * v) == 0]):
            for sp, zero1, rc in itertools.product((False, True) if tp > 1 else (False,),
                                                   (False, True) if dp > 1 else (False,),
                                                   ("none", "selective", "full")):
                lay = Layout(tp, pp, vpp, dp, sp, zero1, rc)
                par = ParallelConfig(tp=tp, pp=pp, vpp=vpp, sp=sp, distributed_optimizer=zero1, recompute=rc)
                try:
                    check_layout(model, par, train, gpus)
                    num_micro = train.global_batch_size // (train.micro_batch_size * dp)
                    check_schedule(par, num_micro, model.num_layers)
                except ConfigError:
                    continue
                mem = memory(model, lay, train.seq_len, train.micro_batch_size, num_micro)
                secs = ideal * step_overhead(model, lay, train.seq_len, num_micro)
                out.append(Candidate(lay, mem, secs, mem.total <= gpu_mem_gib * GIB * 0.9))
    # Among equally fast layouts prefer less TP and PP (less communication), then less memory.
    out.sort(key=lambda c: (round(c.seconds, 6), c.layout.tp * c.layout.pp, c.memory.total))
    return out


def best(cands: list[Candidate]) -> Candidate | None:
    return next((c for c in cands if c.fits), None)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def report(model: ModelConfig, train: TrainConfig, tokens: float, gpu: str, gpus: int, mfu: float,
           gpus_per_node: int = 8, top: int = 12) -> str:
    """The text tools/plan.py prints."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown GPU '{gpu}' (known: {', '.join(GPUS)})")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    mem_gib, peak = GPUS[gpu]
    n = param_count(model)
    flops = training_flops(model, train.seq_len, tokens)
    lines = [f"parameters      {n:,} ({n / 1e9:.2f}B; {param_count(model, include_embedding=False) / 1e9:.2f}B "
             "without the embedding)",
             f"training FLOPs  {flops:.3e} for {tokens:.3e} tokens ({flops_per_token(model, train.seq_len):.3e}/token;"
             f" 6ND = {6 * n * tokens:.3e})",
             f"chinchilla      optimal tokens {chinchilla_tokens(n):.3e} (20/param); fitted loss "
             f"L(N, D) = {chinchilla_loss(n, tokens):.3f} at D = {tokens:.3e}, "
             f"{chinchilla_loss(n, chinchilla_tokens(n)):.3f} at the optimum",
             f"cluster         {gpus} x {gpu} ({mem_gib:.0f} GiB, {peak:.0f} TFLOP/s bf16), MFU {mfu:.0%}; "
             f"seq {train.seq_len}, micro-batch {train.micro_batch_size}, global batch {train.global_batch_size}",
             "",
             f"{'layout':<48} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8}  {'time':>9}  fits",
             ]
    cands = candidates(model, train, gpus, mem_gib, peak, mfu, tokens, gpus_per_node)
    if not cands:
        raise ConfigError(f"no layout of {gpus} GPUs is valid for this model and batch "
                          f"(global batch {train.global_batch_size}, micro-batch {train.micro_batch_size})")
    shown = [c for c in cands if c.fits][:top] or cands[:top]
    for c in shown:
        m = c.memory
        lines.append(f"{c.layout.describe():<48} " + " ".join(f"{x / GIB:7.1f}G" for x in
                     (m.weights, m.grads, m.optimizer, m.activations, m.total))
                     + f"  {_days(c.seconds):>9}  {'yes' if c.fits else 'NO'}")
    pick = best(cands)
    lines.append("")
    if pick is None:
        smallest = min(cands, key=lambda c: c.memory.total)
        lines.append(f"no layout fits in {mem_gib:.0f} GiB (smallest: {smallest.layout.describe()} at "
                     f"{smallest.memory.total / GIB:.1f} GiB); use more GPUs or a smaller micro-batch")
    else:
        lines.append(f"pick: {pick.layout.describe()}: {pick.memory.total / GIB:.1f} GiB/GPU, "
                     f"{_days(pick.seconds)} at {mfu:.0%} MFU")
    return "\n".join(lines)


def _days(s: float) -> str:
    return f"{s / 86400:.1f} d" if s >= 86400 else f"{s / 3600:.1f} h"
