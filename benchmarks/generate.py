"""Decode throughput: megalite.generate with and without the KV cache, next to transformers'
`generate` on the same weights (a random HF Llama, converted to megalite), in one process.

Decode tokens/s = batch * (N - 1) / (time(N new tokens) - time(1 new token)): the prefill is
subtracted, so the figure is the per-token loop. Greedy, no early stop, same prompts for both.

  python benchmarks/generate.py            # GPU: a ~1B Llama shape in bf16, batch 1 and 16
  python benchmarks/generate.py --small    # CPU-sized model (fp32)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megalite  # noqa: E402
from megalite.checkpoint.global_weights import save_global_weights  # noqa: E402
from megalite.config import Config  # noqa: E402
from megalite.hf.convert import hf_to_megalite, model_config_from_hf  # noqa: E402
from megalite.hf.files import read_hf_dir  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, ffn, vocab
    "small": (256, 4, 8, 2, 704, 8192),
    "1b": (2048, 16, 32, 8, 8192, 128256),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def decode_rates(runs: dict[str, Callable[[int], object]], batch: int, new: int, device: torch.device,
                 rounds: int) -> dict[str, float]:
    """Tokens/s per implementation; the rounds alternate between them (a busy machine slows all
    alike) and each keeps its best time for N tokens and for 1 token."""
    for run in runs.values():
        run(2)  # warm-up
    best = {name: [float("inf"), float("inf")] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            best[name][0] = min(best[name][0], _time(lambda run=run: run(new), device))
            best[name][1] = min(best[name][1], _time(lambda run=run: run(1), device))
    return {name: batch * (new - 1) / max(full - first, 1e-9) for name, (full, first) in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-sized model")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (each keeps its best time)")
    ap.add_argument("--no-nocache", action="store_true", help="skip the (slow) no-cache column")
    args = ap.parse_args()
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, layers, heads, kv, ffn, vocab = SHAPES["small" if args.small or device.type == "cpu" else "1b"]
    plen = args.prompt_len or (32 if device.type == "cpu" else 128)
    new = args.new_tokens or (32 if device.type == "cpu" else 128)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                      max_position_embeddings=plen + new + 8, rope_theta=500000.0,
                                      initializer_range=0.05, eos_token_id=None, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(f"{d}/hf")
        config, tensors = read_hf_dir(Path(d) / "hf")
        mcfg = model_config_from_hf(config, "hf")
        save_global_weights(f"{d}/ml", 0, hf_to_megalite(tensors, mcfg, "hf"), Config(model=mcfg))
        ours = megalite.load_model(f"{d}/ml", device=device, dtype=dtype)
    hf = hf.to(device=device, dtype=dtype)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"threads {torch.get_num_threads()}, {dtype}, model h{hidden} L{layers} heads {heads}/{kv} "
          f"vocab {vocab}, prompt {plen}, {new} new tokens, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"{'batch':>5} | {'megalite KV':>12} | {'megalite no-cache':>17} | {'HF generate':>12} | ours/HF")
    g = torch.Generator().manual_seed(1)
    for batch in (int(b) for b in args.batches.split(",")):
        ids = torch.randint(1, vocab, (batch, plen), generator=g)
        prompts = ids.tolist()
        dev_ids = ids.to(device)
        mask = torch.ones_like(dev_ids)

        def hf_run(n: int, dev_ids=dev_ids, mask=mask) -> None:
            with torch.no_grad():
                hf.generate(dev_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)

        runs = {"kv": lambda n, p=prompts: megalite.generate(ours, p, n), "hf": hf_run}
        if not args.no_nocache:
            runs["nocache"] = lambda n, p=prompts: megalite.generate(ours, p, n, use_cache=False)
        r = decode_rates(runs, batch, new, device, args.repeats)
        print(f"{batch:>5} | {r['kv']:>10.1f}/s | {r.get('nocache', float('nan')):>15.1f}/s | {r['hf']:>10.1f}/s "
              f"| {r['kv'] / r['hf']:.2f}x", flush=True)

if __name__ == "__main__":
    main()
