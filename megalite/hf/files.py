"""Reading and writing HF model directories: config.json plus safetensors, single or sharded.

A sharded model is `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}), as `save_pretrained` writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megalite.config import ConfigError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size: cannot read size {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable JSON ({type(e).__name__})") from None


def _weight_files(d: Path) -> list[Path]:
    if (d / INDEX).is_file():
        index = read_json(d / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{d / INDEX}: no 'weight_map' of tensor names to files")
        return [d / f for f in sorted(set(weight_map.values()))]
    if (d / SINGLE).is_file():
        return [d / SINGLE]
    raise ConfigError(f"{d}: neither {SINGLE} nor {INDEX} found (only safetensors weights are supported)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"{path}: weight file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: the file is corrupt
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot read safetensors ({reason})") from None


def read_hf_dir(d: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config.json contents, every tensor). A name found in two files is an error."""
    if not d.is_dir():
        raise ConfigError(f"{d}: input directory not found")
    config = read_json(d / CONFIG)
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(d):
        for name, t in read_safetensors(path).items():
            if name in tensors:
                raise ConfigError(f"{path}: tensor '{name}' also appears in another weight file")
            tensors[name] = t
    return config, tensors


def write_hf_dir(d: Path, config: dict, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Writes config.json and the weights into `d` (an existing, empty temp dir). Tensors are packed
    in order into shards of at most `max_shard_bytes` (a bigger tensor gets a shard of its own).
    Returns the weight file names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}  # transformers checks this before loading
    (d / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], str(d / SINGLE), metadata=meta)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(d / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names
