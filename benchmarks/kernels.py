"""Kernel benchmarks: RMSNorm (alone and with the residual add fused), SwiGLU, cross-entropy and fused
linear cross-entropy.

For each kernel and shape: time (forward, and forward+backward), achieved GB/s counting each input
read once and each output written once, that as a % of the measured copy bandwidth, time ratios
against torch eager, torch.compile and Liger-Kernel (when installed), and peak extra memory for the
cross-entropy variants.

  python benchmarks/kernels.py              # GPU: Llama-3-8B shapes, 8192-32768 tokens, hidden sweep
  python benchmarks/kernels.py --small      # CPU-sized shapes; Triton is skipped without a GPU

On a CPU the Triton kernels only run in the interpreter (numpy, per program), whose time says
nothing about the kernel, so they are skipped there and the CPU rows compare eager vs torch.compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite.model.spec import torch_rms_norm, torch_swiglu  # noqa: E402

# Llama-3-8B
HIDDEN, FFN, VOCAB = 4096, 14336, 128256


# ----------------------------------------------------------------------------------------------
# Implementations: name -> builder returning the callable, or None where unavailable.

def _liger():
    try:
        from liger_kernel.transformers import functional as lf
        return lf
    except ImportError:
        return None


def _ce_eager(logits, labels):
    return F.cross_entropy(logits.float(), labels, reduction="mean")


def _flce_eager(h, w, labels):
    return F.cross_entropy(F.linear(h, w).float(), labels, reduction="mean")


def _add_rms_eager(x, r, w):
    h = r + x
    return torch_rms_norm(h, w, 1e-5), h


def impls(kind: str, device: torch.device, use_compile: bool, interpret: bool) -> dict[str, Callable]:
    eager = {"rmsnorm": lambda x, w: torch_rms_norm(x, w, 1e-5), "swiglu": torch_swiglu,
             "addnorm": _add_rms_eager, "ce": _ce_eager, "flce": _flce_eager}[kind]
    out: dict[str, Callable] = {"eager": eager}
    if use_compile:
        out["compile"] = torch.compile(eager, dynamic=False)
    lf = _liger() if device.type == "cuda" else None
    if lf is not None and kind != "addnorm":
        out["liger"] = {"rmsnorm": lambda x, w: lf.liger_rms_norm(x, w, 1e-5),
                        "swiglu": lf.liger_swiglu,
                        "ce": lambda lg, lab: lf.liger_cross_entropy(lg, lab),
                        "flce": lambda h, w, lab: lf.liger_fused_linear_cross_entropy(h, w, lab)}[kind]
    # Interpreted (CPU) kernels are worth running only where their peak memory is the point.
    if device.type == "cuda" or (interpret and kind in ("ce", "flce")):
        from megalite import kernels as mk
        out["megalite"] = {"rmsnorm": lambda x, w: mk.rms_norm(x, w, 1e-5), "swiglu": mk.swiglu,
                           "addnorm": lambda x, r, w: mk.rms_norm(x, w, 1e-5, residual=r),
                           "ce": lambda lg, lab: mk.cross_entropy(lg, lab, reduction="mean"),
                           "flce": lambda h, w, lab: mk.fused_linear_cross_entropy(h, w, lab, reduction="mean"),
                           }[kind]
        if kind == "flce":
            out["megalite-none"] = lambda h, w, lab: mk.fused_linear_cross_entropy(h, w, lab).sum()
    return out


# ----------------------------------------------------------------------------------------------
# Measurement

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, iters: int) -> float:
    """GB/s of a device-to-device copy (read + write), the practical memory-bandwidth ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * nbytes / t / 1e9


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so that the RSS peak that
    follows counts only what the measured call itself touches."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory above what was live before `fn` ran (CUDA allocator; on Linux CPUs, peak RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        return None
    base = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - base) * 1024


@dataclass
class Row:
    kernel: str
    shape: str
    impl: str
    fwd_ms: float
    fwdbwd_ms: float
    fwd_gbs: float | None = None
    fwdbwd_gbs: float | None = None
    peak_mb: float | None = None
    extra: dict = field(default_factory=dict)


def measure(kind: str, shape: str, name: str, fn: Callable, inputs: list[torch.Tensor], n_diff: int,
            bytes_fwd: int | None, bytes_fwdbwd: int | None, device: torch.device, args) -> Row | None:
    diff = inputs[:n_diff]
    for t in diff:
        t.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwdbwd():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        g = [torch.ones_like(o) for o in outs] if outs[0].dim() else None
        # autograd.grad, not .backward(): nothing accumulates into .grad between iterations
        return torch.autograd.grad(outs, diff, g)

    if name.endswith("(interp)"):  # interpreted kernels: only their peak memory is worth a (slow) call
        peak = peak_extra_bytes(fwdbwd, device)
        return Row(kind, shape, name, float("nan"), float("nan"),
                   peak_mb=peak / 2**20 if peak is not None else None)
    try:
        t_f = timeit(fwd, device, args.warmup, args.iters)
        t_fb = timeit(fwdbwd, device, args.warmup, args.iters)
    except Exception as e:  # e.g. torch.compile failing on this backend: report, keep going
        print(f"  {kind} {shape} {name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return None
    peak = peak_extra_bytes(fwdbwd, device) if kind in ("ce", "flce") else None
    return Row(kind, shape, name, t_f * 1e3, t_fb * 1e3,
               bytes_fwd / t_f / 1e9 if bytes_fwd else None,
               bytes_fwdbwd / t_fb / 1e9 if bytes_fwdbwd else None,
               peak / 2**20 if peak is not None else None)


def run_case(kind: str, shape: str, make_inputs: Callable[[], list[torch.Tensor]], n_diff: int,
             bytes_fwd: int | None, bytes_fwdbwd: int | None, device: torch.device, args) -> list[Row]:
    rows = []
    torch._dynamo.reset()  # one compiled graph per case: shape changes would hit the recompile limit
    for name, fn in impls(kind, device, args.compile, args.interpret).items():
        if device.type == "cpu" and name.startswith("megalite"):
            name += "(interp)"  # runs, and its memory is real, but its time is the interpreter's
        row = measure(kind, shape, name, fn, make_inputs(), n_diff, bytes_fwd, bytes_fwdbwd, device, args)
        if row is not None:
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Cases

def cases(args, device: torch.device, dtype: torch.dtype):
    e = torch.tensor([], dtype=dtype).element_size()
    tokens = args.tokens or ([256, 512] if args.small else [8192, 16384, 32768])
    hidden, ffn, vocab = (1024, 2816, 32000) if args.small else (HIDDEN, FFN, VOCAB)
    sweep = args.sweep or ([1024, 4096, 16384] if args.small else [1024, 2048, 4096, 8192, 16384, 32768, 65536])
    sweep_tokens = 256 if args.small else 8192
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)

    def rms(n, h):
        # fwd: x, w -> y; bwd adds dy in and dx, dw out
        return ("rmsnorm", f"{n}x{h}", lambda: [rnd(n, h), torch.ones(h, device=device, dtype=dtype)], 2,
                (2 * n * h + h) * e, (4 * n * h + 2 * h) * e + n * 4)

    for n in tokens:
        yield rms(n, hidden)
        # The decoder layer's residual add + pre-norm: x, r, w -> y, h; bwd adds dy, dh in and dx, dw out
        yield ("addnorm", f"{n}x{hidden}", lambda n=n: [rnd(n, hidden), rnd(n, hidden),
                                                         torch.ones(hidden, device=device, dtype=dtype)], 3,
               (4 * n * hidden + hidden) * e, (8 * n * hidden + 2 * hidden) * e + n * 4)
        yield ("swiglu", f"{n}x{ffn}", lambda n=n: [rnd(n, ffn), rnd(n, ffn)], 2, 3 * n * ffn * e, 5 * n * ffn * e)
    for h in sweep:
        if h != hidden or sweep_tokens not in tokens:
            yield rms(sweep_tokens, h)
    labels = lambda n: torch.randint(0, vocab, (n,), device=device)
    for n in tokens[: 2 if args.small else 1]:
        yield ("ce", f"{n}x{vocab}", lambda n=n: [rnd(n, vocab), labels(n)], 1, n * vocab * e,
               2 * n * vocab * e)
        yield ("flce", f"{n}x{hidden}x{vocab}", lambda n=n: [rnd(n, hidden), rnd(vocab, hidden) * 0.02,
                                                              labels(n)], 2, None, None)


def fp8_step(args, device: torch.device) -> None:
    """One training step (forward + backward) of an 8B-shaped layer stack: BF16 vs FP8 through TE."""
    import dataclasses

    from megalite.config import ModelConfig
    from megalite.kernels import te
    from megalite.model import LlamaModel
    from megalite.parallel.state import ParallelState

    try:
        te.check_fp8(args.fp8_recipe, device)
    except te.FP8Unavailable as e:
        print(f"fp8 step: skipped: {e}")
        return
    base = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=args.fp8_layers, num_heads=32,
                       num_kv_heads=8, ffn_hidden_size=FFN, max_seq_len=args.fp8_seq, rope_theta=500000.0,
                       loss_impl="fused_linear")
    tokens = torch.randint(0, VOCAB, (1, args.fp8_seq), device=device)
    times = {}
    for label, cfg, fp8 in (("bf16 torch", base, False),
                            ("bf16 te", dataclasses.replace(base, linear_impl="te", mlp_impl="te", norm_impl="te"),
                             False),
                            (f"fp8 te ({args.fp8_recipe})",
                             dataclasses.replace(base, linear_impl="te", mlp_impl="te", norm_impl="te"), True)):
        model = LlamaModel(cfg, ParallelState(device=device), device=device)
        model.init_weights(1)
        ctx = te.fp8_autocast_factory("fp8" if fp8 else "bf16", args.fp8_recipe)

        def step(model=model, ctx=ctx):
            with torch.autocast("cuda", dtype=torch.bfloat16), ctx():
                loss = model(tokens, labels=tokens)
            loss.float().mean().backward()

        times[label] = timeit(step, device, 3, 10)
        print(f"fp8 step: {label:18s} {times[label] * 1e3:8.2f} ms  "
              f"({args.fp8_layers} layers, seq {args.fp8_seq}, Llama-3-8B shapes)", flush=True)
        del model
        torch.cuda.empty_cache()
    fp8_t = times[f"fp8 te ({args.fp8_recipe})"]
    print(f"fp8 step: speedup over bf16 torch {times['bf16 torch'] / fp8_t:.2f}x, over bf16 te "
          f"{times['bf16 te'] / fp8_t:.2f}x (target >= 1.3x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU-sized shapes")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="bfloat16 on a GPU, float32 on a CPU by default")
    p.add_argument("--tokens", type=int, nargs="*")
    p.add_argument("--sweep", type=int, nargs="*", help="RMSNorm hidden sizes")
    p.add_argument("--only", nargs="*", choices=["rmsnorm", "addnorm", "swiglu", "ce", "flce"])
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--interpret", action="store_true",
                   help="on a CPU, also run the Triton kernels in the interpreter: peak memory is "
                        "meaningful, time is not")
    p.add_argument("--fp8-step", action="store_true", help="also time BF16 vs FP8 training steps (GPU + TE)")
    p.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "current", "mxfp8"])
    p.add_argument("--fp8-layers", type=int, default=4)
    p.add_argument("--fp8-seq", type=int, default=8192)
    args = p.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: set it before import
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 2)
    args.iters = args.iters if args.iters is not None else (50 if device.type == "cuda" else 10)
    if device.type != "cuda":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print("note: no GPU: Liger skipped; Triton kernels " + (
            "interpreted: their times are the interpreter's, only their peak memory means something"
            if args.interpret else "skipped (the CPU interpreter times Python, not kernels; see --interpret)"))
    bw = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 27, args.warmup, args.iters)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, dtype {dtype}, torch {torch.__version__}, copy bandwidth {bw:.1f} GB/s")
    print("GB/s count each input read once and each output written once; vs_X=a/b: X's time over this "
          "row's, forward/forward+backward (>1: this row is faster); peak: extra memory over the inputs")

    rows: list[Row] = []
    for kind, shape, make, n_diff, b_f, b_fb in cases(args, device, dtype):
        if args.only and kind not in args.only:
            continue
        got = run_case(kind, shape, make, n_diff, b_f, b_fb, device, args)
        base = {r.impl: r for r in got}
        for r in got:
            for ref in ("eager", "compile", "liger"):
                if ref in base and ref != r.impl and not r.impl.endswith("(interp)"):
                    r.extra[f"vs_{ref}"] = (base[ref].fwd_ms / r.fwd_ms, base[ref].fwdbwd_ms / r.fwdbwd_ms)
            pct = lambda g: f"{g:7.1f} GB/s {100 * g / bw:5.1f}%" if g else " " * 20
            ratios = " ".join(f"{k}={a:.2f}x/{b:.2f}x" for k, (a, b) in r.extra.items())
            peak = f" peak {r.peak_mb:8.1f} MB" if r.peak_mb is not None else ""
            print(f"{r.kernel:8s} {r.shape:>20s} {r.impl:14s} fwd {r.fwd_ms:8.3f} ms {pct(r.fwd_gbs)} | "
                  f"fwd+bwd {r.fwdbwd_ms:8.3f} ms {pct(r.fwdbwd_gbs)}{peak}  {ratios}", flush=True)
        rows.extend(got)
    if args.fp8_step:
        fp8_step(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "dtype": str(dtype), "copy_gbs": bw,
                       "rows": [r.__dict__ for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
