"""Convert model weights between HF Llama (safetensors) and megalite checkpoints.

    python tools/convert_checkpoint.py --from hf --to megalite --input Llama-3.2-1B --output ckpt/
    python tools/convert_checkpoint.py --from megalite --to hf --input runs/x/checkpoints --output hf/

hf -> megalite writes a weights-only checkpoint (`step_00000000`, `latest`) that any TP/PP/DP layout
loads (Adam starts fresh), plus `megalite_model.yaml`, the `model:` section to train it with.
megalite -> hf reads a step directory or a checkpoint root (its `latest`) and writes config.json
and model.safetensors (sharded above --max-shard-size) for `LlamaForCausalLM.from_pretrained`.
--merge-lora reads a LoRA (adapter-only) checkpoint and its base, folds W += alpha/r * B @ A into
the base weights, and writes them as HF (--to hf) or as a plain megalite checkpoint (--to megalite).
The output appears atomically: everything is written into a temp dir that is then renamed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import _common
import torch
import yaml

from megalite.checkpoint.dist import replace_path, saved_model_config
from megalite.checkpoint.global_weights import load_global_weights, save_global_weights
from megalite.checkpoint.lora import merged_global_weights
from megalite.config import Config, ConfigError
from megalite.hf.convert import (
    hf_config_from_model,
    hf_to_megalite,
    megalite_to_hf,
    model_config_from_hf,
    model_yaml_section,
)
from megalite.hf.files import CONFIG, parse_size, read_hf_dir, write_hf_dir
from megalite.hf.tokenizer_export import export_tokenizer

MODEL_YAML = "megalite_model.yaml"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cast(weights: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    return weights if dtype == "auto" else {k: v.to(DTYPES[dtype]) for k, v in weights.items()}


def hf_to_megalite_dir(src: Path, dst: Path, dtype: str) -> str:
    config, tensors = read_hf_dir(src)
    model = model_config_from_hf(config, str(src / CONFIG))
    weights = _cast(hf_to_megalite(tensors, model, str(src)), dtype)
    step_dir = save_global_weights(dst, 0, weights, Config(model=model), {"converted_from": str(src)})
    header = f"# megalite model section for the weights converted from {src}\n"
    (dst / MODEL_YAML).write_text(header + yaml.safe_dump(model_yaml_section(model), sort_keys=False))
    return f"{len(weights)} tensors -> {step_dir.name}, {MODEL_YAML}"


def megalite_to_hf_dir(src: Path, dst: Path, dtype: str, max_shard_bytes: int,
                       tokenizer: tuple[str | None, str | None] = (None, None), merge: bool = False) -> str:
    meta, weights = merged_global_weights(src) if merge else load_global_weights(src)
    where = f"{src} (step {meta.get('step')})"
    model = saved_model_config(meta, where)
    tok_type, tok_model = _run_tokenizer(meta, *tokenizer)  # checked before anything is written
    hf = megalite_to_hf(_cast(weights, dtype), model, where)
    config = hf_config_from_model(model, hf["model.embed_tokens.weight"].dtype, where)
    files = write_hf_dir(dst, config, hf, max_shard_bytes)
    summary = f"step {meta.get('step')}: {len(weights)} tensors -> {CONFIG}, {', '.join(files)}"
    if tok_type == "none":
        return summary + "; no tokenizer (--tokenizer-type none)"
    return f"{summary}; {export_tokenizer(tok_type, tok_model, dst)}"


def _run_tokenizer(meta: dict, tok_type: str | None, tok_model: str | None) -> tuple[str, str]:
    """The tokenizer the run trained with (its saved data config), unless given on the command line."""
    data = (meta.get("config") or {}).get("data") or {}
    tok_type = tok_type or data.get("tokenizer_type") or "byte"
    tok_model = tok_model if tok_model is not None else data.get("tokenizer_model") or ""
    if tok_type not in ("none", "byte") and not Path(tok_model).exists():
        raise ConfigError(f"the run's tokenizer model {tok_model!r} ({tok_type}) is not found from here: pass "
                          f"--tokenizer-model PATH, or --tokenizer-type none to export the weights alone")
    return tok_type, tok_model


def merged_megalite_dir(src: Path, dst: Path, dtype: str) -> str:
    """A LoRA checkpoint merged into its base, as a weights-only megalite checkpoint (like an HF import)."""
    meta, weights = merged_global_weights(src)
    model = saved_model_config(meta, f"{src} (step {meta.get('step')})")
    step_dir = save_global_weights(dst, int(meta["step"]), _cast(weights, dtype), Config(model=model),
                                   {"merged_from": str(src)})
    header = f"# megalite model section for the LoRA-merged weights of {src}\n"
    (dst / MODEL_YAML).write_text(header + yaml.safe_dump(model_yaml_section(model), sort_keys=False))
    return f"{len(weights)} tensors (LoRA merged) -> {step_dir.name}, {MODEL_YAML}"


def write_atomically(output: Path, overwrite: bool, fill: Callable[[Path], str]) -> str:
    """Fills a temp dir beside `output`, then renames it into place; a failure leaves no output."""
    if output.exists() and not (output.is_dir() and not any(output.iterdir())) and not overwrite:
        raise ConfigError(f"{output}: output exists and is not empty (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should get the usual mode
    try:
        summary = fill(tmp)
        replace_path(tmp, output)  # an existing output is moved aside, not deleted, until this one is in place
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src_fmt", choices=("hf", "megalite"), required=True)
    ap.add_argument("--to", dest="dst_fmt", choices=("hf", "megalite"), required=True)
    ap.add_argument("--input", required=True, type=Path, help="HF model dir, or megalite step dir / checkpoint root")
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                    help="dtype of the written weights (auto: as stored in the input)")
    ap.add_argument("--max-shard-size", default="5GB", help="HF output: split model.safetensors above this size")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    ap.add_argument("--tokenizer-type", default=None,
                    help="megalite -> hf: the tokenizer to export beside the weights (default: the run's; none: skip)")
    ap.add_argument("--tokenizer-model", default=None, help="megalite -> hf: its model file (default: the run's)")
    ap.add_argument("--merge-lora", action="store_true",
                    help="--input is a LoRA checkpoint: fold its adapters into its base before writing")
    args = ap.parse_args()
    if args.merge_lora and args.src_fmt != "megalite":
        raise ConfigError("--merge-lora reads a megalite LoRA checkpoint: use --from megalite")
    if args.src_fmt == args.dst_fmt and not args.merge_lora:
        raise ConfigError(f"--from and --to are both '{args.src_fmt}'; nothing to convert")
    if args.merge_lora and args.dst_fmt == "megalite":
        summary = write_atomically(args.output, args.overwrite, lambda d: merged_megalite_dir(args.input, d, args.dtype))
    elif args.src_fmt == "hf":
        summary = write_atomically(args.output, args.overwrite,
                                   lambda d: hf_to_megalite_dir(args.input, d, args.dtype))
    else:
        shard_bytes = parse_size(args.max_shard_size)
        summary = write_atomically(args.output, args.overwrite,
                                   lambda d: megalite_to_hf_dir(args.input, d, args.dtype, shard_bytes,
                                                                (args.tokenizer_type, args.tokenizer_model),
                                                                args.merge_lora))
    print(f"converted {args.input} ({args.src_fmt}) -> {args.output} ({args.dst_fmt}): {summary}")


if __name__ == "__main__":
    _common.run_main(main)
