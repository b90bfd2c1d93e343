"""Data-pipeline benchmark: megalite against megatron-core on the same input and the same cores.

    python benchmarks/data_pipeline.py                      # defaults: 10^8 and 10^9 tokens
    python benchmarks/data_pipeline.py --index-tokens 1e8 --prep-mb 8 --loader-tokens 2e7

Timings are best-of-N (the machine may be shared); the table says how many.

(a) preprocessing tokens/s: our tools/preprocess_data.py engine against Megatron's builder path,
    i.e. the loop of Megatron-LM's tools/preprocess_data.py (a Pool.imap over lines in chunks of
    32, one json.loads and one tokenizer call per document, megatron.core's
    IndexedDatasetBuilder.add_document per document), with the same SentencePiece model, input
    and worker count. The two outputs are also compared byte for byte.
(b) sample-index build for synthetic document sizes: ours against megatron-core's compiled
    helpers_cpp.build_sample_idx (results compared for equality), plus the whole three-array index
    (document order, samples, shuffle) against megatron's own GPTDataset functions. Time and peak
    memory (VmHWM growth) are measured in a fresh process per run.
(c) dataloader samples/s at seq 4096 from the mmap'ed shard, through get_micro_batch.

megatron-core is installed only into a separate venv (.bench-venv, created on first use, sharing
this interpreter's torch/numpy through a .pth file). Where it cannot be installed or run, the
table says so and still shows our numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".bench-venv"
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
# Measured tasks; each runs in a fresh process (`--task NAME --spec JSON`) and prints one JSON line.


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in KiB; 0 where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Restart VmHWM from the current RSS, so input preparation does not mask the build's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _synthetic_sizes(tokens: int, seed: int = 0):
    """Log-normal document sizes (median ~250 tokens, long tail to 10^6, ~1% empty) summing to ~`tokens`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = max(1, int(tokens / 520))
    sizes = np.minimum(rng.lognormal(5.5, 1.2, n), 1_000_000).astype(np.int32)
    sizes[rng.random(n) < 0.01] = 0
    return sizes


def task_index(spec: dict) -> dict:
    import numpy as np

    sizes = _synthetic_sizes(int(spec["tokens"]))
    seq, seed, impl, what = 4096, 1234, spec["impl"], spec["what"]
    tpe = int(sizes.sum(dtype=np.int64))
    docs = np.arange(len(sizes), dtype=np.int32)
    if what == "sample_idx":  # the helper alone, on the same shuffled document order
        doc_idx = np.random.default_rng(seed).permutation(len(sizes)).astype(np.int32)
    if impl == "megatron":
        from megatron.core.datasets import helpers
        from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index
    else:
        from megalite import _C

    def build():
        if impl == "megatron":
            if what == "sample_idx":
                return helpers.build_sample_idx(sizes, doc_idx, seq, 1, tpe, True, True)
            rs = np.random.RandomState(seed)
            d = _build_document_index(docs, 1, rs, False)
            out = helpers.build_sample_idx(sizes, d, seq, 1, tpe, True, True)
            _build_shuffle_index(len(out) - 1, len(out) - 1, rs)
            return out
        threads = int(spec.get("threads", 1))
        if what == "sample_idx":
            return _C.build_sample_idx(sizes, doc_idx, seq, 1, tpe, True, 1, threads)
        d = _C.build_document_index(docs, 1, seed)
        out = _C.build_sample_idx(sizes, d, seq, 1, tpe, True, 1, threads)
        _C.build_shuffle_index(len(out) - 1, seed)
        return out

    # Peak memory from the first run; time as the best of several (the machine is shared).
    _reset_peak()
    base = _status_kib("VmRSS")
    times = []
    for _ in range(int(spec.get("repeat", 5))):
        t = time.perf_counter()
        out = build()
        times.append(time.perf_counter() - t)
        if len(times) == 1:
            peak = (_status_kib("VmHWM") - base) / 1024
    dt = min(times)
    digest = int(np.asarray(out, dtype=np.int64).sum()) if what == "sample_idx" else None
    return {"seconds": dt, "peak_mib": peak, "samples": len(out) - 1, "tokens": tpe,
            "digest": digest}


def task_prep_megatron(spec: dict) -> dict:
    """Megatron-LM's preprocess_data.py loop, driven through megatron.core's builder."""
    import multiprocessing as mp

    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    model, src, out, workers = spec["model"], spec["input"], spec["output"], spec["workers"]
    sp = spm.SentencePieceProcessor(model_file=model)
    vocab, eod = sp.get_piece_size(), sp.eos_id()
    t = time.perf_counter()
    with mp.get_context("fork").Pool(workers, initializer=_mg_init, initargs=(model,)) as pool, open(src) as fin:
        builder = IndexedDatasetBuilder(out + ".bin", dtype=DType.optimal_dtype(vocab))
        tokens = docs = 0
        for ids in pool.imap(_mg_encode, fin, 32):
            ids.append(eod)
            builder.add_document(np.array(ids), [len(ids)])  # as Megatron: one sentence per document
            tokens += len(ids)
            docs += 1
        builder.finalize(out + ".idx")
    return {"seconds": time.perf_counter() - t, "tokens": tokens, "docs": docs}


_mg_sp = None


def _mg_init(model: str) -> None:
    global _mg_sp
    import sentencepiece as spm

    _mg_sp = spm.SentencePieceProcessor(model_file=model)


def _mg_encode(line: str) -> list[int]:
    return _mg_sp.encode_as_ids(json.loads(line)["text"])


def task_prep_ours(spec: dict) -> dict:
    from megalite.data.preprocess import preprocess

    t = time.perf_counter()
    st = preprocess([spec["input"]], spec["output"], "sentencepiece", spec["model"], ["text"], True,
                    spec["workers"], progress=False)
    return {"seconds": time.perf_counter() - t, "tokens": st.tokens["text"], "docs": st.docs}


def task_loader(spec: dict) -> dict:
    import numpy as np

    from megalite.data.datasets import GPTDataset
    from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter
    from megalite.data.sampler import get_micro_batch

    prefix = spec["prefix"]
    if not os.path.exists(prefix + ".idx"):
        sizes = _synthetic_sizes(int(spec["tokens"]), 1)
        rng = np.random.default_rng(0)
        with IndexedDatasetWriter(prefix, vocab_size=32000) as w:
            for s in range(0, len(sizes), 20000):
                part = sizes[s : s + 20000].astype(np.int64)
                w.add_documents(rng.integers(0, 32000, int(part.sum()), dtype=np.uint16), part)
    shard = IndexedDataset(prefix)
    ds = GPTDataset(shard, (0, shard.num_documents), 4096, seed=1)
    mbs, n = int(spec["mbs"]), len(ds)
    get_micro_batch(ds, 0, 0, mbs, 0, 1)  # warm the page cache for a steady-state number
    batch_rate = item_rate = 0.0
    for _ in range(3):  # best of 3 rounds: the machine may be shared
        t = time.perf_counter()
        done, micro = 0, 0
        while done < min(n * 2, 40000):
            get_micro_batch(ds, 0, micro, mbs, 0, 1)
            micro += 1
            done += mbs
        batch_rate = max(batch_rate, done / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(min(n, 5000)):
            ds[i]
        item_rate = max(item_rate, min(n, 5000) / (time.perf_counter() - t))
    return {"batch_samples_per_s": batch_rate, "item_samples_per_s": item_rate, "samples": n,
            "tokens": shard.num_tokens}


TASKS = {"index": task_index, "prep_megatron": task_prep_megatron, "prep_ours": task_prep_ours,
         "loader": task_loader}


# ---------------------------------------------------------------------------------------------
# Driver


def _run(python: str, task: str, spec: dict, timeout: float = 3600) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([python, __file__, "--task", task, "--spec", json.dumps(spec)], capture_output=True,
                       text=True, env=env, timeout=timeout, cwd=ROOT)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{task} failed: {err}"}
    return json.loads(lines[-1])


def megatron_python() -> tuple[str | None, str]:
    """The bench venv's interpreter with megatron-core importable, creating it if needed."""
    py = BENCH_VENV / "bin" / "python"
    probe = "from megatron.core.datasets import helpers_cpp; import megatron.core; print(megatron.core.__version__)"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if not py.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True, capture_output=True)
            site = next(p for p in sys.path if p.endswith("site-packages"))
            pth = next((BENCH_VENV / "lib").glob("python*/site-packages")) / "zz_megalite_venv.pth"
            pth.write_text(site + "\n")
            # --no-deps: torch and numpy come from this interpreter's site-packages (no CUDA wheels).
            subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "megatron-core"], check=True,
                           capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError, StopIteration) as e:
            return None, f"cannot create {BENCH_VENV} with megatron-core: {e}"
    r = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env=env, cwd="/")
    if r.returncode != 0:
        return None, "megatron-core not importable: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return str(py), r.stdout.strip().splitlines()[-1]


def make_corpus(path: Path, megabytes: float) -> None:
    """JSONL of real, never-repeated text: the Python stdlib's sources (tests included, ~30 MB), one
    document per block between blank-line runs, in file order."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    target = int(megabytes * (1 << 20))
    written = 0
    with open(path, "w") as f:
        for src in sorted(root.rglob("*.py")):
            if "site-packages" in src.parts:
                continue
            try:
                text = src.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for piece in text.split("\n\n\n"):
                if piece.strip():
                    line = json.dumps({"text": piece}) + "\n"
                    f.write(line)
                    written += len(line)
            if written >= target:
                return
    print(f"note: the corpus holds {written / (1 << 20):.1f} MB, less than the {megabytes:g} MB asked for")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--index-tokens", default="1e8,1e9", help="comma-separated corpus sizes for (b)")
    p.add_argument("--prep-mb", type=float, default=24.0, help="JSONL megabytes for (a)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--loader-tokens", type=float, default=5e7, help="tokens in the shard for (c)")
    p.add_argument("--repeat", type=int, default=3, help="preprocessing runs per side (best kept)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: prep,index,loader")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    if args.task:
        print(json.dumps(TASKS[args.task](json.loads(args.spec))), flush=True)
        return

    skip = set(filter(None, args.skip.split(",")))
    mpy, mver = megatron_python()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(f"# data pipeline benchmark  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  commit {commit}  "
          f"cpus {os.cpu_count()}  megatron-core: {mver if mpy else 'UNAVAILABLE (' + mver + ')'}")
    rows: list[tuple[str, str, str, str]] = []
    work = Path(args.workdir or tempfile.mkdtemp(prefix="megalite-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    if "prep" not in skip:
        corpus, model = work / "corpus.jsonl", work / "sp.model"
        if not corpus.exists():
            make_corpus(corpus, args.prep_mb)
        if not model.exists():
            subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--input", str(corpus),
                            "--vocab-size", str(args.vocab), "--output", str(model), "--max-docs", "20000"],
                           check=True, capture_output=True, cwd=ROOT)
        spec = {"input": str(corpus), "model": str(model), "workers": args.workers}
        ours_runs, their_runs = [], []
        for _ in range(args.repeat):  # alternate, and keep each side's best run (the machine is shared)
            ours_runs.append(_run(sys.executable, "prep_ours", {**spec, "output": str(work / "ours")}))
            if mpy:
                their_runs.append(_run(mpy, "prep_megatron", {**spec, "output": str(work / "mg_text_document")}))
        ours, theirs = _best(ours_runs), (_best(their_runs) if mpy else None)
        same = ""
        if theirs and "error" not in theirs and "error" not in ours:
            same = all((work / f"ours_text_document{e}").read_bytes() == (work / f"mg_text_document{e}").read_bytes()
                       for e in (".bin", ".idx"))
            same = "outputs byte-identical" if same else "OUTPUTS DIFFER"
        rows.append(_ratio_row(f"(a) preprocess {args.prep_mb:g} MB JSONL, {args.workers} workers, tokens/s, best of {args.repeat}",
                               ours, theirs, lambda r: r["tokens"] / r["seconds"], higher=True,
                               fmt="{:,.0f}", note=same))

    if "index" not in skip:
        for tok in [float(x) for x in args.index_tokens.split(",") if x]:
            for what in ("sample_idx", "full"):
                label = f"(b) {'build_sample_idx' if what == 'sample_idx' else 'doc+sample+shuffle index'} {tok:.0e} tokens"
                theirs = _run(mpy, "index", {"tokens": tok, "impl": "megatron", "what": what}) if mpy else None
                for th in (1, 2):
                    ours = _run(sys.executable, "index", {"tokens": tok, "impl": "ours", "what": what, "threads": th})
                    note = f"{th} thread{'s' if th > 1 else ''}"
                    if theirs and "error" not in theirs and "error" not in ours:
                        note += f", mem {ours['peak_mib']:.0f} vs {theirs['peak_mib']:.0f} MiB"
                        if what == "sample_idx":
                            note += ", equal" if ours["digest"] == theirs["digest"] else ", DIFFERENT"
                    rows.append(_ratio_row(label + " (s, best of 5)", ours, theirs, lambda r: r["seconds"], higher=False,
                                           fmt="{:.4f}", note=note))

    if "loader" not in skip:
        r = _run(sys.executable, "loader", {"prefix": str(work / "loader"), "tokens": args.loader_tokens, "mbs": 8})
        if "error" in r:
            rows.append(("(c) dataloader", r["error"], "", ""))
        else:
            rows.append(("(c) dataloader seq 4096, get_micro_batch mbs 8 (samples/s, best of 3)",
                         f"{r['batch_samples_per_s']:,.0f}", "", "target >= 50,000"))
            rows.append(("(c) dataloader seq 4096, dataset[i] (samples/s, best of 3)", f"{r['item_samples_per_s']:,.0f}", "",
                         f"{r['samples']:,} samples over {r['tokens']:,} tokens"))

    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'megalite':>14}  {'megatron-core':>14}  {'ratio':>8}  note")
    for name, ours_s, theirs_s, note in rows:
        ratio = ""
        if "|" in note:
            ratio, note = note.split("|", 1)
        print(f"{name:<{w}}  {ours_s:>14}  {theirs_s:>14}  {ratio:>8}  {note}")
    print(f"(ratio: megalite's advantage, >1 is better; work dir {work})")


def _best(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    return min(ok, key=lambda r: r["seconds"]) if ok else runs[-1]


def _ratio_row(name, ours, theirs, metric, higher, fmt, note=""):
    if "error" in ours:
        return (name, "error", "", ours["error"])
    o = metric(ours)
    if not theirs:
        return (name, fmt.format(o), "n/a", "|megatron-core unavailable; " + note)
    if "error" in theirs:
        return (name, fmt.format(o), "error", "|" + theirs["error"])
    t = metric(theirs)
    ratio = (o / t) if higher else (t / o if o > 0 else float("inf"))
    return (name, fmt.format(o), fmt.format(t), f"{ratio:.2f}x|{note}")


if __name__ == "__main__":
    main()
