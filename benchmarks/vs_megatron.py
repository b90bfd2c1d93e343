"""megalite against megatron-core: the same Llama model, batch and optimizer, trained side by side.

    python benchmarks/vs_megatron.py --shape tiny                      # TP1, one process
    python benchmarks/vs_megatron.py --shape 55m --tp 2 --sp --spawn 2  # TP2+SP, 2 gloo ranks (CPU)
    torchrun --nproc_per_node 2 benchmarks/vs_megatron.py --shape 1b --tp 2 --sp   # GPUs (NCCL)

Both models live in one process and take turns, step by step (megalite, megatron, megalite, ...),
on the same synthetic micro-batches, so load from other processes hits both alike. Each step is a
full optimizer step: forward and backward over the step's micro-batches, TP grad sync, clipping
at 1.0 and AdamW (lr 3e-4, betas 0.9/0.95, wd 0.1 on matrices only), with fp32 weights and
autocast to BF16 on a GPU (fp32 on a CPU). megalite runs its own trainer step; megatron-core runs
GPTModel with the local (non-TE) layer spec, torch AdamW and its own TP-aware grad norm.
Printed: ms per step (median), tokens/s, their ratio, and on a GPU the peak memory of each side
(its resident weights, grads and optimizer state plus its step's transient peak).

megatron-core: `pip install --no-deps megatron-core==0.19.2` (Python 3.12; 0.16.1 on 3.11). It
imports without TE or Apex (falling back to torch norms and optimizers). On a GPU it runs unpatched.
On a CPU, `patch_megatron_for_cpu` changes, clearly and only in this process, the five places
where it hard-codes CUDA (see there). With SP, megatron's torch-norm fallback refuses
sequence parallelism (no TE, no Apex here), so the SP model uses torch.nn.RMSNorm marked
`sequence_parallel` and this script all-reduces those grads over TP, as megatron's
finalize_model_grads does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import SyntheticTokens  # noqa: E402
from megalite.config import load_config  # noqa: E402
from megalite.model.flops import param_count  # noqa: E402
from megalite.training.trainer import Trainer  # noqa: E402

_RUN_DIRS = tempfile.TemporaryDirectory(prefix="megalite_vs_megatron_")  # per process: run dirs are locked

# hidden, layers, heads, kv heads, ffn, vocab, seq, micro-batch, global batch, tied
SHAPES = {
    "tiny": dict(hidden=128, layers=4, heads=4, kv=2, ffn=384, vocab=512, seq=128, mbs=4, gbs=8, tied=False),
    "55m": dict(hidden=512, layers=8, heads=8, kv=4, ffn=1408, vocab=32000, seq=512, mbs=2, gbs=4, tied=False),
    "1b": dict(hidden=2048, layers=16, heads=32, kv=8, ffn=8192, vocab=128256, seq=4096, mbs=1, gbs=4, tied=True),
}
LR, BETAS, EPS, WD, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


# ---------------------------------------------------------------------------------------------
# megatron-core on a CPU: the patches (only applied when there is no GPU).

def patch_megatron_for_cpu() -> list[str]:
    """megatron-core assumes CUDA in a few places; on a CPU each is redirected to the CPU here.
    Returns what was patched, printed with the results. Nothing in megalite is patched."""
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import dot_product_attention, utils

    done = []
    # 1. RNG tracker: its streams are CUDA generator states; keep them as CPU generator states.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    saved = torch.get_rng_state()
    torch.manual_seed(2718 + _tp_rank())
    tracker.states_[mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME] = torch.get_rng_state()
    torch.set_rng_state(saved)
    done.append("RNG tracker streams kept as CPU generator states")
    # 2 and 5. RoPE moves inv_freq to torch.cuda.current_device(); the SP all-gather /
    # reduce-scatter (and the global memory buffer) allocate their outputs there. One redirect
    # of current_device to the CPU covers both.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    done.append("torch.cuda.current_device -> 'cpu' (RoPE's inv_freq move; SP collectives' output buffers)")
    assert rotary_pos_embedding is not None
    # 3. The default causal mask is built on device="cuda".
    cpu_mask = lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool()  # noqa: E731
    utils.get_default_causal_mask = cpu_mask
    if hasattr(dot_product_attention, "get_default_causal_mask"):
        dot_product_attention.get_default_causal_mask = cpu_mask
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("megatron.") and hasattr(mod, "get_default_causal_mask"):
            mod.get_default_causal_mask = cpu_mask
    done.append("default causal mask built on the CPU")
    # 4. Grad clipping: the norm is reduced through a tensor created on device='cuda'.
    clip_grads.get_grad_norm_fp32 = _cpu_grad_norm_fp32
    done.append("grad-norm reduction tensor on the CPU")
    return done


def _cpu_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None) -> float:
    """megatron's get_grad_norm_fp32 (L2 case) with its reduction tensor on the CPU."""
    if isinstance(grads_for_norm, torch.Tensor):
        grads_for_norm = [grads_for_norm]
    total = torch.zeros(1, dtype=torch.float32)
    for g in grads_for_norm:
        total += g.float().pow(2).sum()
    if grad_stats_parallel_group is not None:
        dist.all_reduce(total, group=grad_stats_parallel_group)
    return float(total.sqrt())


def _tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


# ---------------------------------------------------------------------------------------------
# The megatron-core side.

class MegatronSide:
    def __init__(self, shape: dict, tp: int, sp: bool, device: torch.device) -> None:
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
        from megatron.core.transformer.transformer_config import TransformerConfig

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        self.patches: list[str] = []
        if device.type == "cuda":
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
        else:
            self.patches = patch_megatron_for_cpu()
        self.device, self.sp = device, sp and tp > 1
        cfg = TransformerConfig(
            num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
            num_query_groups=shape["kv"], ffn_hidden_size=shape["ffn"], kv_channels=shape["hidden"] // shape["heads"],
            gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
            add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
            tensor_model_parallel_size=tp, sequence_parallel=self.sp, params_dtype=torch.float32,
            use_cpu_initialization=device.type != "cuda", gradient_accumulation_fusion=False,
            bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
            bias_dropout_fusion=False, apply_rope_fusion=False)
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        norm = SPRMSNorm if self.sp else layer.submodules.input_layernorm
        if self.sp:
            # megatron's torch-norm fallback asserts no SP; use torch.nn.RMSNorm marked for a TP
            # grad all-reduce (done in step(), as finalize_model_grads would).
            layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = SPRMSNorm
        spec = TransformerBlockSubmodules(layer_specs=[layer] * shape["layers"], layer_norm=norm)
        self.model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=shape["vocab"],
                              max_sequence_length=shape["seq"], position_embedding_type="rope",
                              rotary_base=10000, share_embeddings_and_output_weights=shape["tied"]).to(device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                                     lr=LR, betas=BETAS, eps=EPS)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.mp_group = parallel_state.get_model_parallel_group()

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batches: list[dict]) -> float:
        from megatron.core.optimizer import clip_grads
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        n = sum(int(mb["num_loss_tokens"]) for mb in batches)
        total = 0.0
        for mb in batches:
            with self.autocast():
                loss = self.model(input_ids=mb["tokens"], position_ids=_positions(mb), attention_mask=None,
                                  labels=mb["labels"])
            s = loss.float().sum()
            (s / n).backward()
            total += float(s.detach())
        if self.sp:
            for p in self.model.parameters():
                if getattr(p, "sequence_parallel", False) and p.grad is not None:
                    dist.all_reduce(p.grad, group=self.tp_group)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params if param_is_not_tensor_parallel_duplicate(p)]
        norm = clip_grads.get_grad_norm_fp32(grads, grad_stats_parallel_group=self.mp_group)
        if norm > CLIP:
            for p in params:
                p.grad.mul_(CLIP / (norm + 1e-6))
        self.opt.step()
        return total / n


class SPRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm under megatron's norm constructor; its weight sees a sequence shard, so
    it is marked for the TP grad all-reduce."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = True


def _positions(mb: dict) -> torch.Tensor:
    if mb.get("position_ids") is not None:
        return mb["position_ids"]
    b, s = mb["tokens"].shape
    return torch.arange(s, device=mb["tokens"].device).unsqueeze(0).expand(b, s)


# ---------------------------------------------------------------------------------------------

def megalite_trainer(shape: dict, tp: int, sp: bool, steps: int, device: torch.device) -> tuple[Trainer, SyntheticTokens]:
    overrides = [
        f"model.vocab_size={shape['vocab']}", f"model.hidden_size={shape['hidden']}",
        f"model.num_layers={shape['layers']}", f"model.num_heads={shape['heads']}",
        f"model.num_kv_heads={shape['kv']}", f"model.ffn_hidden_size={shape['ffn']}",
        f"model.max_seq_len={shape['seq']}", f"model.tie_embeddings={str(shape['tied']).lower()}",
        "model.rope_theta=10000", "model.make_vocab_size_divisible_by=128",
        f"parallel.tp={tp}", f"parallel.sp={str(sp and tp > 1).lower()}", "parallel.distributed_optimizer=false",
        f"train.seq_len={shape['seq']}", f"train.micro_batch_size={shape['mbs']}",
        f"train.global_batch_size={shape['gbs']}", f"train.train_steps={steps}",
        f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}", f"train.device={device.type}",
        f"optim.lr={LR}", f"optim.min_lr={LR}", "optim.warmup_steps=0", "optim.decay=constant",
        f"optim.beta1={BETAS[0]}", f"optim.beta2={BETAS[1]}", f"optim.eps={EPS}", f"optim.weight_decay={WD}",
        f"optim.clip_grad={CLIP}", "data.tokenizer_type=byte", "data.reset_at_eod=false", "checkpoint.load=",
        "checkpoint.save_on_exit=false", "train.progress_bar=false", "train.log_interval=1000000",
        f"train.run_dir={_RUN_DIRS.name}"]
    cfg = load_config(None, overrides)
    ds = SyntheticTokens(shape["vocab"], shape["seq"])
    return Trainer(cfg, datasets=(ds, None)), ds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _resident(device: torch.device) -> float:
    return torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def run(rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(1234)
    shape = dict(SHAPES[args.shape])
    if args.seq:
        shape["seq"] = args.seq
    if args.gbs:
        shape["gbs"] = args.gbs
    tp = args.tp
    total = args.steps + args.warmup
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if not dist.is_initialized():  # megatron's parallel_state needs a process group, even of one
        from megalite.testing import free_port

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                init_method=os.environ.get("MASTER_ADDR") and "env://"
                                or f"tcp://127.0.0.1:{free_port()}")
    mem0 = _resident(device)
    tr, ds = megalite_trainer(shape, tp, args.sp, total, device)
    mem1 = _resident(device)
    mg = MegatronSide(shape, tp, args.sp, device)
    mem2 = _resident(device)
    resident = {"megalite": mem1 - mem0, "megatron": mem2 - mem1}
    times: dict[str, list[float]] = {"megalite": [], "megatron": []}
    peaks: dict[str, float] = {"megalite": 0.0, "megatron": 0.0}
    losses: dict[str, list[float]] = {"megalite": [], "megatron": []}
    opt_state: dict[str, float] = {}
    for i in range(total):
        batches = tr._batches(ds, i * tr.cfg.train.global_batch_size)
        for name in ("megalite", "megatron") if i % 2 == 0 else ("megatron", "megalite"):
            _sync(device)
            before = _resident(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            if name == "megalite":
                loss = tr.train_step(batches)[0]
                tr.state.step += 1
            else:
                loss = mg.step(batches)
            _sync(device)
            dt = time.perf_counter() - t0
            losses[name].append(loss)
            if i == 0:
                opt_state[name] = _resident(device) - before  # the optimizer state appears at step 1
            if i >= args.warmup:
                times[name].append(dt)
                if device.type == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30 - before)
    tokens = shape["gbs"] * shape["seq"]
    out = {"shape": args.shape, "tp": tp, "sp": bool(args.sp and tp > 1), "world": world,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
           "params": param_count(tr.cfg.model), "seq": shape["seq"], "global_batch": shape["gbs"],
           "steps": args.steps, "patches": mg.patches,
           # this rank's parameter counts: equal when both sides build the same model
           "local_params": {"megalite": sum(p.numel() for c in tr.chunks for p in c.parameters()),
                            "megatron": sum(p.numel() for p in mg.model.parameters())}}
    for name in times:
        step = statistics.median(times[name])
        out[name] = {"step_ms": 1e3 * step, "tokens_per_sec": tokens / step, "first_loss": losses[name][0],
                     "last_loss": losses[name][-1],
                     "peak_mem_gib": (resident[name] + opt_state[name] + peaks[name]) if device.type == "cuda" else None}
    out["speedup"] = out["megatron"]["step_ms"] / out["megalite"]["step_ms"]
    tr.metrics.close()
    return out


def report(res: dict) -> str:
    lines = [f"vs megatron-core | shape {res['shape']} ({res['params'] / 1e6:.1f}M params, seq {res['seq']}, "
             f"global batch {res['global_batch']}) | TP{res['tp']}{'+SP' if res['sp'] else ''} on {res['world']} "
             f"rank(s) | {res['device']} | median of {res['steps']} interleaved steps"]
    for name in ("megalite", "megatron"):
        r = res[name]
        mem = f" | peak mem {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else ""
        lines.append(f"  {name:9s} step {r['step_ms']:9.1f} ms | tokens/s {r['tokens_per_sec']:10,.0f} | "
                     f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}{mem}")
    lines.append(f"  ratio (megatron step / megalite step): {res['speedup']:.2f}x | rank-0 parameters: "
                 f"megalite {res['local_params']['megalite']:,}, megatron {res['local_params']['megatron']:,}")
    if res["patches"]:
        lines.append("  megatron-core CPU patches: " + "; ".join(res["patches"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=0, help="override the shape's sequence length")
    ap.add_argument("--gbs", type=int, default=0, help="override the shape's global batch")
    ap.add_argument("--spawn", type=int, default=0, help="launch this many gloo ranks here (CPU)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: megatron-core is not installed ({e}); pip install --no-deps megatron-core==0.19.2")
    if args.spawn:
        from megalite.testing import run_distributed

        res = run_distributed(_spawned, args.spawn, args)[0]
    else:
        res = run(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), args)
        if dist.is_initialized() and dist.get_rank() != 0:
            return
    print(report(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if not math.isfinite(res["megatron"]["last_loss"]) or not math.isfinite(res["megalite"]["last_loss"]):
        sys.exit("error: a non-finite loss")


def _spawned(rank: int, world: int, args: argparse.Namespace) -> dict:
    return run(rank, world, args)


if __name__ == "__main__":
    main()
