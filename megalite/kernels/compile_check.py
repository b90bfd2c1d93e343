"""Every launch variant of our Triton kernels, compiled ahead of time for a GPU target, no GPU needed.

The CPU interpreter checks the kernels' numbers but is laxer than the compiler (types of loop-carried
values, constexpr rules), and says nothing about registers. This compiles each (kernel, dtypes,
constexprs, num_warps) combination that the wrappers launch for the shapes we care about, down to
a cubin with Triton's bundled ptxas, and reads ptxas's resource report: registers per thread and
spill bytes. A spilling variant is the slow cliff that wide rows fall off elsewhere. It also counts
the PTX global loads and stores by width: row traffic should move in 128-bit accesses.

  python -m megalite.kernels.compile_check            # sm_90 (H100/H200)
  python -m megalite.kernels.compile_check --arch 100
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megalite.kernels._common import warps_for

# By module path: the package re-exports functions under these same names.
ce = importlib.import_module("megalite.kernels.cross_entropy")
rn = importlib.import_module("megalite.kernels.rmsnorm")
sg = importlib.import_module("megalite.kernels.swiglu")

# RMSNorm hidden sizes from the sweep (1k-64k); the rest run at Llama-3-8B's sizes.
HIDDEN_SWEEP = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
FLOATS = {"eps", "smooth", "inv_vocab", "z_loss"}  # fp32 scalar arguments; other scalars are ints
UNALIGNED = {"ignore_index", "n_rows", "n_progs", "vocab_start"}  # ints not assumed divisible by 16


@dataclass
class Variant:
    name: str
    fn: object  # a triton JITFunction
    pointers: dict[str, str]  # arg -> Triton element type, e.g. {"X": "bf16"}
    constexprs: dict[str, object]
    num_warps: int = 4

    def source(self) -> ASTSource:
        sig, attrs = {}, {}
        for i, arg in enumerate(self.fn.arg_names):
            if arg in self.constexprs:
                sig[arg] = "constexpr"
            elif arg in self.pointers:
                sig[arg] = "*" + self.pointers[arg]
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            elif arg in FLOATS:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
                if arg not in UNALIGNED:  # strides and widths of the Llama shapes are multiples of 16
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(fn=self.fn, signature=sig, constexprs=self.constexprs, attrs=attrs)


def _rms(h: int, x: str, res: str | None, y: str) -> list[Variant]:
    """The launches `rms_norm` makes for hidden size h: forward, then one or two backward kernels."""
    hd = res if res == "fp32" else x  # h = x + residual keeps the wider dtype
    tag = f"h={h} x={x}" + (f" res={res}" if res else "") + f" y={y}"
    single = h <= rn.FWD_MAX_BLOCK
    fb = rn._block(h, rn.FWD_MAX_BLOCK) if single else rn.LOOP_BLOCK
    out = [Variant(f"rmsnorm fwd {tag}", rn._rms_fwd_kernel,
                   dict(X=x, R=res or x, W="fp32", Y=y, H=hd, RSTD="fp32"),
                   dict(HAS_RES=res is not None, BLOCK=fb, SINGLE=single), warps_for(fb))]
    bwd_ptrs = dict(DY=y, X=hd, W="fp32", RSTD="fp32", DH=hd, DX=hd, DW_PART="fp32", C="fp32")
    if h <= rn.BWD_MAX_BLOCK:
        bb = rn._block(h, rn.BWD_MAX_BLOCK)
        out.append(Variant(f"rmsnorm bwd {tag}", rn._rms_bwd_kernel, bwd_ptrs,
                           dict(HAS_DH=res is not None, WHOLE_ROW=True, BLOCK=bb), warps_for(bb)))
    else:
        lb, lw = rn.LOOP_BLOCK, warps_for(rn.LOOP_BLOCK)
        out.append(Variant(f"rmsnorm bwd dot {tag}", rn._rms_bwd_dot_kernel, bwd_ptrs, dict(BLOCK=lb), lw))
        out.append(Variant(f"rmsnorm bwd cols {tag}", rn._rms_bwd_kernel, bwd_ptrs,
                           dict(HAS_DH=res is not None, WHOLE_ROW=False, BLOCK=lb), lw))
    return out


def variants() -> list[Variant]:
    out: list[Variant] = []
    for h in HIDDEN_SWEEP:
        out += _rms(h, "bf16", None, "bf16")
        out += _rms(h, "bf16", "fp32", "bf16")  # the decoder layer's fused add under bf16 autocast
    out += _rms(4096, "fp32", None, "bf16")  # the attention pre-norm on the fp32 stream
    out += _rms(4096, "fp16", "fp16", "fp16")
    out += _rms(4096, "fp32", "fp32", "fp32")
    for dt in ("bf16", "fp16", "fp32"):
        out.append(Variant(f"swiglu fwd {dt}", sg._swiglu_fwd_kernel, dict(G=dt, U=dt, A=dt),
                           dict(BLOCK=sg._BLOCK)))
        for store_a in (False, True):
            out.append(Variant(f"swiglu bwd {dt} store_a={store_a}", sg._swiglu_bwd_kernel,
                               dict(DA=dt, G=dt, U=dt, DG=dt, DU=dt, A=dt),
                               dict(STORE_A=store_a, BLOCK=sg._BLOCK)))
    for dt in ("bf16", "fp32"):
        for smooth in (False, True):
            out.append(Variant(f"ce stats {dt} smooth={smooth}", ce._ce_stats_kernel,
                               dict(X=dt, LABELS="i64", STATS="fp32"),
                               dict(HAS_SMOOTH=smooth, BLOCK=ce._BLOCK), warps_for(ce._BLOCK)))
        out.append(Variant(f"ce grad {dt}", ce._ce_grad_kernel,
                           dict(X=dt, DX=dt, LABELS="i64", LSE="fp32", SCALE="fp32"),
                           dict(BLOCK=ce._BLOCK), warps_for(ce._BLOCK)))
    return out


_RES = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                              "-o", os.path.join(d, "k.o")], capture_output=True, text=True, check=True).stderr
    regs = [int(m) for m in _RES.findall(log)]
    spills = [(int(a), int(b)) for a, b in _SPILL.findall(log)]
    return {"registers": max(regs, default=0), "spill_stores": sum(a for a, _ in spills),
            "spill_loads": sum(b for _, b in spills)}


def _memory_ops(ptx: str) -> dict:
    """Global loads/stores by width: the bulk row traffic should be 128-bit (v4.b32) accesses;
    scalar ones are the per-row values (rstd, labels, statistics)."""
    ops = re.findall(r"\b(ld|st)\.global((?:\.\w+)*)", ptx)
    return {"v4_loads": sum(o == "ld" and ".v4" in w for o, w in ops),
            "v4_stores": sum(o == "st" and ".v4" in w for o, w in ops),
            "scalar_loads": sum(o == "ld" and ".v" not in w for o, w in ops),
            "scalar_stores": sum(o == "st" and ".v" not in w for o, w in ops)}


def compile_variant(v: Variant, arch: int = 90) -> dict:
    k = triton.compile(v.source(), target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps})
    return {"cubin_bytes": len(k.asm["cubin"]), **_ptxas_report(k.asm["ptx"], arch), **_memory_ops(k.asm["ptx"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--json", help="also write every variant's result here")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("error: compile_check needs TRITON_INTERPRET unset (interpreted kernels do not compile)")
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    rows, bad = [], 0
    for v in variants():
        try:
            r = compile_variant(v, args.arch)
        except Exception as e:  # report every failing variant, not just the first
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            print(f"FAIL  {v.name:48s} {r['error']}")
        else:
            flag = "SPILL" if r["spill_stores"] or r["spill_loads"] else "ok   "
            print(f"{flag} {v.name:48s} warps {v.num_warps:2d}  regs {r['registers']:3d}  "
                  f"spill st/ld {r['spill_stores']}/{r['spill_loads']} B  128-bit ld/st "
                  f"{r['v4_loads']}/{r['v4_stores']}  scalar ld/st {r['scalar_loads']}/{r['scalar_stores']}",
                  flush=True)
        bad += "error" in r or bool(r.get("spill_stores") or r.get("spill_loads"))
        rows.append({"name": v.name, "num_warps": v.num_warps, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "variants": rows}, f, indent=1)
    print(f"{len(rows) - bad}/{len(rows)} variants compile without spilling")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
